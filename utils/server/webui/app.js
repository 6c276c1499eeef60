// μOmni chat page. Plain JavaScript, no build step, no outside requests: it talks only to this server's OpenAI
// endpoints. Everything the user or the server writes is put on the page as text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "muomni.apiKey";
const CHAT_AUDIO = ["wav", "mp3", "flac", "ogg"];  // the input_audio formats /v1/chat/completions takes
const SAMPLE_RATE = 16000;  // the model's audio rate: recordings and other audio are converted to it

const state = {
  model: null,          // the model id from /v1/models
  history: [],          // earlier turns, text only: {role, content}
  attachments: [],      // {kind: "image", name, url} | {kind: "audio", name, format, data (base64)}
  controller: null,     // the AbortController of the answer being streamed
  recorder: null,       // the running MediaRecorder
  recording: null,      // the last recording, as the browser recorded it (a Blob)
  transcribed: null,    // {blob, name}: what the transcription panel transcribed last, for the downloads
  objectUrls: [],       // blob: URLs of spoken answers, revoked on a new chat
};

class PageError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

// ------------------------------------------------------------------ talking to the server

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// The server's own words for a failed request: "401: missing or wrong API key ...", plus Retry-After on 429.
async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = `${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON: the status line says it */ }
  const retry = response.headers.get("Retry-After");
  if (response.status === 429 && retry) message += ` (retry after ${retry} s)`;
  return new PageError(message, response.status);
}

async function api(path, init = {}) {
  const response = await fetch(path, { ...init, headers: { ...authHeaders(), ...(init.headers || {}) } });
  if (!response.ok) throw await failure(response);
  return response;
}

function showError(error) {
  const box = $("error");
  box.textContent = error instanceof Error ? error.message : String(error);
  box.hidden = false;
  if (error instanceof PageError && error.status === 401) {
    $("settings").open = true;
    $("api-key").focus();
  }
}

function hideError() { $("error").hidden = true; $("error").textContent = ""; }

// ------------------------------------------------------------------ the model card

async function loadModel() {
  const card = $("model-card");
  try {
    const models = await (await api("/v1/models")).json();
    const m = models.data[0];
    state.model = m.id;
    $("model-name").textContent = `${m.id} · context ${m.context_length}`;
    card.replaceChildren();
    const d = m.details || {};
    const t = d.thinker || {};
    const v = d.vocabulary || {};
    const g = d.generation_defaults || {};
    const rows = [["id", m.id], ["context length", m.context_length],
                  ["components", (m.components || []).join(", ")], ["owned by", m.owned_by]];
    if (m.details) {  // what --info shows, less the server's file paths
      rows.push(["format", d.format], ["parameters", Number(d.parameters).toLocaleString("en")],
                ["dtype / device", `${d.dtype} / ${d.device}`], ["decode step", d.decode_kernel],
                ["decode attention", d.decode_attention],
                ["thinker", `${t.layers} layers, d ${t.d_model}, ${t.heads} heads (${t.kv_heads} KV), ${t.ffn} ${t.d_ff}`],
                ["vocabulary", `${v.embedding_rows} rows, ${v.tokenizer_pieces} tokenizer pieces`],
                ["generation defaults", Object.entries(g).map(([k, x]) => `${k} ${x}`).join(", ")]);
    }
    for (const [name, value] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.textContent = String(value);
      card.append(dt, dd);
    }
  } catch (error) {
    $("model-name").textContent = "model card unavailable";
    showError(error);
  }
}

// ------------------------------------------------------------------ attachments

function readAs(blob, how) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader[how](blob);
  });
}

async function base64Of(blob) {
  const url = await readAs(blob, "readAsDataURL");
  return url.slice(url.indexOf(",") + 1);
}

// Any audio the browser can decode (its own webm/opus or ogg recordings, m4a, ...) as a 16 kHz mono 16-bit WAV,
// so it can go to the chat endpoint, whose input_audio formats are wav/mp3/flac/ogg.
async function toWav(blob) {
  const decoder = new OfflineAudioContext(1, 1, SAMPLE_RATE);
  const audio = await decoder.decodeAudioData(await blob.arrayBuffer());  // resampled to SAMPLE_RATE
  const n = audio.length;
  const mono = new Float32Array(n);
  for (let c = 0; c < audio.numberOfChannels; c++) {
    const channel = audio.getChannelData(c);
    for (let i = 0; i < n; i++) mono[i] += channel[i] / audio.numberOfChannels;
  }
  const out = new DataView(new ArrayBuffer(44 + 2 * n));
  const text = (at, s) => { for (let i = 0; i < s.length; i++) out.setUint8(at + i, s.charCodeAt(i)); };
  text(0, "RIFF"); out.setUint32(4, 36 + 2 * n, true); text(8, "WAVE");
  text(12, "fmt "); out.setUint32(16, 16, true); out.setUint16(20, 1, true); out.setUint16(22, 1, true);
  out.setUint32(24, audio.sampleRate, true); out.setUint32(28, 2 * audio.sampleRate, true);
  out.setUint16(32, 2, true); out.setUint16(34, 16, true);
  text(36, "data"); out.setUint32(40, 2 * n, true);
  for (let i = 0; i < n; i++) out.setInt16(44 + 2 * i, Math.max(-1, Math.min(1, mono[i])) * 0x7fff, true);
  return new Blob([out.buffer], { type: "audio/wav" });
}

function extension(name) {
  const dot = name.lastIndexOf(".");
  return dot < 0 ? "" : name.slice(dot + 1).toLowerCase();
}

async function audioAttachment(blob, name) {
  const ext = extension(name);
  if (CHAT_AUDIO.includes(ext)) return { kind: "audio", name, format: ext, data: await base64Of(blob) };
  let wav;
  try {
    wav = await toWav(blob);
  } catch (error) {
    throw new PageError(`${name}: this browser cannot decode it (${error.message}); attach wav, mp3, flac or ogg`);
  }
  return { kind: "audio", name: name.replace(/\.[^.]*$/, "") + ".wav", format: "wav", data: await base64Of(wav) };
}

function attach(item) {
  if (item.kind === "audio") {  // one audio clip per message: the μOmni prompt has one audio slot
    state.attachments = state.attachments.filter((a) => a.kind !== "audio");
  }
  state.attachments.push(item);
  renderAttachments();
}

async function addFiles(files) {
  for (const file of files) {
    try {
      if (file.type.startsWith("image/")) {
        attach({ kind: "image", name: file.name || "image", url: await readAs(file, "readAsDataURL") });
      } else if (file.type.startsWith("audio/") || CHAT_AUDIO.includes(extension(file.name))) {
        attach(await audioAttachment(file, file.name || "audio"));
      } else {
        throw new PageError(`${file.name}: not an image or an audio file`);
      }
    } catch (error) {
      showError(error);
    }
  }
}

function mediaChip(item) {
  if (item.kind === "image") {
    const img = document.createElement("img");
    img.src = item.url;
    img.alt = item.name;
    return img;
  }
  const chip = document.createElement("span");
  chip.className = "chip";
  chip.textContent = `♪ ${item.name}`;
  return chip;
}

function renderAttachments() {
  const list = $("attachments");
  list.replaceChildren();
  state.attachments.forEach((item, i) => {
    const li = document.createElement("li");
    li.dataset.kind = item.kind;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = `remove ${item.name}`;
    remove.addEventListener("click", () => { state.attachments.splice(i, 1); renderAttachments(); });
    li.append(mediaChip(item), remove);
    list.append(li);
  });
}

// ------------------------------------------------------------------ the chat

function addMessage(role, text, media = []) {
  const li = document.createElement("li");
  li.className = `msg ${role}`;
  if (media.length) {
    const row = document.createElement("div");
    row.className = "media";
    row.append(...media.map(mediaChip));
    li.append(row);
  }
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  li.append(content);
  $("messages").append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function numberField(id, name, into) {
  const value = $(id).value.trim();
  if (value !== "") into[name] = Number(value);  // the server checks the range and says what is wrong
}

function requestBody(content) {
  const messages = [];
  const system = $("system").value;
  if (system.trim()) messages.push({ role: "system", content: system });
  messages.push(...state.history, { role: "user", content });
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  if (state.model) body.model = state.model;
  numberField("temperature", "temperature", body);
  numberField("top-p", "top_p", body);
  numberField("max-tokens", "max_tokens", body);
  numberField("seed", "seed", body);
  if ($("speak").checked) {
    body.modalities = ["text", "audio"];
    body.audio = { format: "wav" };
  }
  return body;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function audioPlayer(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const url = URL.createObjectURL(new Blob([bytes], { type: "audio/wav" }));
  state.objectUrls.push(url);
  const player = document.createElement("audio");
  player.controls = true;
  player.preload = "metadata";
  player.src = url;
  return player;
}

// Reads the SSE stream of one answer into `li`; returns what the stats line needs. Times are from the request:
// tStart when the first chunk (the role, sent once the prompt is prefilled) came, tFirst the first text, tEnd the
// chunk after the last token (the finish, or the spoken answer, which is made before it).
async function readStream(response, li, t0) {
  const content = li.querySelector(".content");
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const out = { text: "", usage: null, audio: null, finish: null, tStart: null, tFirst: null, tEnd: null };
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return out;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new PageError(chunk.error.message);
      const now = performance.now() - t0;
      out.tStart = out.tStart ?? now;
      if (chunk.usage) out.usage = chunk.usage;
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      if (delta.content) {
        out.tFirst = out.tFirst ?? now;
        out.text += delta.content;
        content.textContent = out.text;
      }
      if (delta.audio) out.audio = delta.audio.data;
      if ((delta.audio || choice.finish_reason) && out.tEnd === null) out.tEnd = now;
      if (choice.finish_reason) out.finish = choice.finish_reason;
    }
  }
  throw new PageError("the answer stream ended before [DONE]");
}

function statsLine(out, notes) {
  const parts = [];
  if (out.usage) parts.push(`${out.usage.completion_tokens} tokens`);
  if (out.usage && out.tEnd > out.tStart) {
    const rate = `${(out.usage.completion_tokens / ((out.tEnd - out.tStart) / 1000)).toFixed(1)} tokens/s`;
    parts.push(out.audio ? `${rate} with the speech` : rate);
  }
  if (out.tFirst !== null) parts.push(`TTFT ${Math.round(out.tFirst)} ms`);
  if (out.finish && out.finish !== "stop") parts.push(`finish: ${out.finish}`);
  return [...parts, ...notes].join(" · ");
}

async function send() {
  if (state.controller) return;
  const text = $("prompt").value;
  const media = state.attachments;
  if (!text.trim() && !media.length) return;
  hideError();
  const parts = [];
  if (text.trim()) parts.push({ type: "text", text });
  for (const item of media) {
    parts.push(item.kind === "image" ? { type: "image_url", image_url: { url: item.url } }
                                     : { type: "input_audio", input_audio: { data: item.data, format: item.format } });
  }
  const content = media.length ? parts : text;
  const body = requestBody(content);
  addMessage("user", text, media);
  $("prompt").value = "";
  state.attachments = [];
  renderAttachments();

  const li = addMessage("assistant", "");
  li.classList.add("pending");
  const stats = document.createElement("div");
  stats.className = "stats";
  li.append(stats);
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const t0 = performance.now();
  let out = { text: "" };
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: controller.signal });
    const notes = [];
    const ignored = Number(response.headers.get("X-Omni-Ignored-Messages") || 0);
    if (ignored) notes.push(`the model read the last message only (${ignored} earlier left out)`);
    const warnings = response.headers.get("X-Omni-Warnings");
    if (warnings) notes.push(warnings);
    out = await readStream(response, li, t0);
    stats.textContent = statsLine(out, notes);
    if (out.audio) li.append(audioPlayer(out.audio));
    li.classList.add("done");
  } catch (error) {
    if (error.name === "AbortError") {
      stats.textContent = "stopped";
      li.classList.add("stopped");
    } else {
      li.classList.add("failed");
      stats.textContent = "failed";
      showError(error);
    }
  } finally {
    li.classList.remove("pending");
    state.controller = null;
    setBusy(false);
  }
  if (!li.classList.contains("failed")) {
    state.history.push({ role: "user", content: text }, { role: "assistant", content: out.text || "" });
  }
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.history = [];
  state.attachments = [];
  renderAttachments();
  $("messages").replaceChildren();
  state.objectUrls.forEach((url) => URL.revokeObjectURL(url));
  state.objectUrls = [];
  hideError();
  $("prompt").focus();
}

// ------------------------------------------------------------------ the microphone

async function toggleRecording() {
  if (state.recorder) {
    state.recorder.stop();
    return;
  }
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    showError("recording needs a browser with MediaRecorder and a secure page (https, or http on localhost)");
    return;
  }
  let stream;
  try {
    // the raw signal: the browser's voice processing (echo cancelling, noise suppression, gain control) changes
    // the sound the model was trained on
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false } });
  } catch (error) {
    showError(`the microphone: ${error.message}`);
    return;
  }
  hideError();
  const type = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus", "audio/webm"]
    .find((t) => MediaRecorder.isTypeSupported(t));
  const recorder = new MediaRecorder(stream, { audioBitsPerSecond: 128000, ...(type ? { mimeType: type } : {}) });
  const chunks = [];
  const started = performance.now();
  const clock = $("record-time");
  clock.textContent = "0.0 s";
  clock.hidden = false;
  const tick = () => { clock.textContent = `${((performance.now() - started) / 1000).toFixed(1)} s`; };
  const timer = setInterval(tick, 100);
  recorder.addEventListener("dataavailable", (e) => { if (e.data.size) chunks.push(e.data); });
  recorder.addEventListener("stop", async () => {
    clearInterval(timer);
    stream.getTracks().forEach((t) => t.stop());
    state.recorder = null;
    $("record").textContent = "Record";
    $("record").setAttribute("aria-pressed", "false");
    const blob = new Blob(chunks, { type: recorder.mimeType });
    state.recording = blob;
    $("transcribe-recording").disabled = false;
    try {
      attach(await audioAttachment(blob, recordingName(blob)));
    } catch (error) {
      showError(error);
    }
  });
  recorder.start(250);
  state.recorder = recorder;
  $("record").textContent = "Stop recording";
  $("record").setAttribute("aria-pressed", "true");
}

function recordingName(blob) {
  return blob.type.startsWith("audio/ogg") ? "recording.ogg" : "recording.webm";
}

// ------------------------------------------------------------------ transcription

function clock(seconds) {
  const m = Math.floor(seconds / 60);
  return `${m}:${(seconds - 60 * m).toFixed(2).padStart(5, "0")}`;
}

async function transcribe(blob, name) {
  hideError();
  $("transcript-status").textContent = `transcribing ${name}…`;
  $("transcript-text").textContent = "";
  $("transcript-segments").replaceChildren();
  $("download-srt").hidden = $("download-vtt").hidden = true;
  try {
    const result = await (await api("/v1/audio/transcriptions",
      { method: "POST", body: transcriptionForm(blob, name, "verbose_json") })).json();
    $("transcript-text").textContent = result.text;
    for (const segment of result.segments) {
      const li = document.createElement("li");
      const time = document.createElement("span");
      time.className = "time";
      time.textContent = `${clock(segment.start)} → ${clock(segment.end)}`;
      li.append(time, document.createTextNode(segment.text));
      $("transcript-segments").append(li);
    }
    $("transcript-status").textContent = `${name}: ${result.duration.toFixed(2)} s of audio`;
    state.transcribed = { blob, name };
    $("download-srt").hidden = $("download-vtt").hidden = false;
  } catch (error) {
    $("transcript-status").textContent = "";
    showError(error);
  }
}

function transcriptionForm(blob, name, format) {
  const form = new FormData();
  form.append("file", blob, name);
  if (state.model) form.append("model", state.model);
  form.append("response_format", format);
  return form;
}

// The subtitles come from the server's own formatter (response_format srt / vtt), fetched when asked for.
async function download(format) {
  const { blob, name } = state.transcribed;
  try {
    const subtitles = await (await api("/v1/audio/transcriptions",
      { method: "POST", body: transcriptionForm(blob, name, format) })).blob();
    const url = URL.createObjectURL(subtitles);
    const a = document.createElement("a");
    a.href = url;
    a.download = name.replace(/\.[^.]*$/, "") + `.${format}`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  } catch (error) {
    showError(error);
  }
}

// ------------------------------------------------------------------ the API key

function setupKey() {
  const field = $("api-key");
  const remember = $("remember-key");
  const stored = localStorage.getItem(KEY_STORE);
  if (stored !== null) {
    field.value = stored;
    remember.checked = true;
  }
  const keep = () => {
    if (remember.checked) localStorage.setItem(KEY_STORE, field.value);
    else localStorage.removeItem(KEY_STORE);
  };
  remember.addEventListener("change", keep);
  field.addEventListener("input", () => { if (remember.checked) keep(); });
  field.addEventListener("change", loadModel);
}

// ------------------------------------------------------------------ wiring

function setup() {
  setupKey();
  if (window.matchMedia("(max-width: 800px)").matches) {  // a phone: the chat first, the panels folded below it
    for (const id of ["settings", "model", "transcription"]) $(id).open = false;
  }
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("prompt").addEventListener("paste", (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])];
    if (files.length) {
      e.preventDefault();
      addFiles(files);
    }
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("new-chat").addEventListener("click", newChat);
  $("file-input").addEventListener("change", (e) => { addFiles([...e.target.files]); e.target.value = ""; });
  $("record").addEventListener("click", toggleRecording);

  const chat = $("chat");
  window.addEventListener("dragover", (e) => e.preventDefault());  // a file dropped elsewhere is not opened
  window.addEventListener("drop", (e) => e.preventDefault());
  chat.addEventListener("dragover", (e) => { e.preventDefault(); chat.classList.add("dropping"); });
  chat.addEventListener("dragleave", () => chat.classList.remove("dropping"));
  chat.addEventListener("drop", (e) => {
    e.preventDefault();
    chat.classList.remove("dropping");
    addFiles([...e.dataTransfer.files]);
  });

  $("transcribe-file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) transcribe(file, file.name);
    e.target.value = "";
  });
  $("transcribe-recording").addEventListener("click",
    () => transcribe(state.recording, recordingName(state.recording)));
  $("download-srt").addEventListener("click", () => download("srt"));
  $("download-vtt").addEventListener("click", () => download("vtt"));
  loadModel();
}

setup();
