"""serve.py's request fields: every field the installed `openai` package types for chat completions, speech and
transcriptions is implemented (with a test that shows it), accepted without effect (it cannot change the answer),
or refused with a 400 naming it (utils/server/protocol.py's tables); unknown fields are refused too. And the
audio fields: speech formats and speed, spoken-answer formats, streamed transcription, timestamp granularities.

One demo server for the module, talked to with the official `openai` client; audio decoded with PyAV.
"""
from __future__ import annotations

import ast
import io
import re
from typing import Iterator

import httpx
import numpy as np
import openai
import pytest
from openai.types.audio import speech_create_params, transcription_create_params
from openai.types.chat import completion_create_params

from tests.conftest import DEMO, EXAMPLES, REPO
from tests.test_serve import Served, server
from utils.server.protocol import CHAT_FIELDS, OPTION_FIELDS, SPEECH_FIELDS, TRANSCRIPTION_FIELDS

QUESTION = [{"role": "user", "content": "What is 3 plus 4?"}]
WAV = EXAMPLES / "green_triangle.wav"


def typed_fields(*params: type) -> set[str]:
    """The field names of the `openai` package's request TypedDicts (the streaming variants add `stream`)."""
    return {name for p in params for name in p.__required_keys__ | p.__optional_keys__}


TABLES = {
    "chat": (CHAT_FIELDS, typed_fields(completion_create_params.CompletionCreateParamsBase,
                                       completion_create_params.CompletionCreateParamsStreaming)),
    "speech": (SPEECH_FIELDS, typed_fields(speech_create_params.SpeechCreateParams)),
    "transcription": (TRANSCRIPTION_FIELDS,
                      typed_fields(transcription_create_params.TranscriptionCreateParamsBase,
                                   transcription_create_params.TranscriptionCreateParamsStreaming)),
}


# ------------------------------------------------------------------ the tables (no server)

@pytest.mark.parametrize("endpoint", list(TABLES))
def test_every_typed_field_has_a_row(endpoint: str) -> None:
    table, typed = TABLES[endpoint]
    assert sorted(typed - set(table)) == []
    assert {f.status for f in table.values()} <= {"implemented", "no effect", "refused"}


def test_each_implemented_row_names_an_existing_test() -> None:
    defined: dict[str, set[str]] = {}
    for name, field in [(n, f) for table, _ in TABLES.values() for n, f in table.items()]:
        if field.status != "implemented":
            continue
        path, _, test = field.note.partition("::")
        if path not in defined:
            tree = ast.parse((REPO / path).read_text())
            defined[path] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert test.startswith("test_") and test in defined[path], (name, field.note)


def test_the_option_fields_are_implemented_and_no_effect_fields_documented() -> None:
    """A generation option the table of options serves (utils/base/options.py) must not be refused here: adding one
    there means turning its row into `implemented`. The README lists every no-effect field."""
    assert [n for n in OPTION_FIELDS if CHAT_FIELDS[n].status != "implemented"] == []
    readme = (REPO / "README.md").read_text()
    listed = re.search(r"accepted without effect.*?\n\n", readme, re.S)
    assert listed, "README: the no-effect list"
    for table, _ in TABLES.values():
        for name, field in table.items():
            if field.status == "no effect":
                assert f"`{name}`" in listed.group(0), name
    parameters = re.search(r"\*\*Every chat-completion parameter\*\*.*?\n\n.*?\n\n", readme, re.S)
    assert parameters, "README: the table of chat-completion parameters"
    missing = [name for name in CHAT_FIELDS if f"`{name}`" not in parameters.group(0)]
    assert missing == [], f"README's parameter table lacks {missing}"


def test_tempo_keeps_the_pitch() -> None:
    """Speed changes the duration and keeps a tone's pitch (a resample would double it at 2x)."""
    from utils.media.audio import change_tempo
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000)).astype(np.float32)
    assert change_tempo(tone, 16000, 1.0) is tone
    for speed in (0.25, 0.5, 2.0, 4.0):
        out = change_tempo(tone, 16000, speed)
        assert abs(len(out) / 16000 - 2.0 / speed) < 0.05 * 2.0 / speed, (speed, len(out))
        peak = np.argmax(np.abs(np.fft.rfft(out))) * 16000 / len(out)
        assert abs(peak - 440) < 5, (speed, peak)


# ------------------------------------------------------------------ over HTTP

@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    if not (DEMO / "omni_sft_tiny" / "omni.pt").is_file():
        pytest.skip(f"{DEMO} not built (run: python tools/train_demo.py)")
    with server() as s:
        yield s


@pytest.fixture(scope="module")
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.base}/v1", api_key="unused", max_retries=0, timeout=120)


def refusal(call) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    return info.value


# realistic values for the refused chat fields (any other non-null value is refused as well)
REFUSED_EXAMPLES = {
    "frequency_penalty": 0.5, "presence_penalty": 1.0, "logit_bias": {"434": -100}, "logprobs": True,
    "top_logprobs": 2, "response_format": {"type": "json_object"}, "tool_choice": "required",
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "parallel_tool_calls": True, "functions": [{"name": "f", "parameters": {"type": "object"}}],
    "function_call": "auto", "prediction": {"type": "content", "content": "7"}, "reasoning_effort": "low",
    "verbosity": "low", "web_search_options": {}, "moderation": {"model": "omni-moderation-latest"},
    "max_new_tokens": 3, "decode_attention": "reference", "decode_kernel": "torch", "fast_greedy": False,
}
NO_EFFECT_EXAMPLES = {
    "user": "u-1", "safety_identifier": "s-1", "metadata": {"k": "v"}, "store": True, "service_tier": "auto",
    "prompt_cache_key": "k", "prompt_cache_retention": "24h", "prompt_cache_options": {"ttl": "1h"},
    "parallel_tool_calls": True,
}


def answer(client: openai.OpenAI, **fields) -> str:
    return client.chat.completions.create(model="muomni", messages=QUESTION, max_tokens=6,
                                          extra_body=fields).choices[0].message.content


def test_chat_fields_refused_by_name(client: openai.OpenAI) -> None:
    refused = [n for n, f in CHAT_FIELDS.items() if f.status == "refused"]
    assert refused
    for name in refused:
        err = refusal(lambda: answer(client, **{name: REFUSED_EXAMPLES.get(name, 1)}))
        assert err.param == name and err.code == "unsupported_parameter", (name, err.body)
        assert CHAT_FIELDS[name].note in err.message
    err = refusal(lambda: answer(client, frobnicate=1))
    assert err.param == "frobnicate" and err.code == "unknown_parameter"
    err = refusal(lambda: client.chat.completions.create(model="muomni", messages=QUESTION, modalities=["text", "audio"],
                                                         audio={"format": "wav", "voice": "alloy", "pitch": 2}))
    assert err.param == "audio.pitch"


def test_neutral_and_no_effect_fields_leave_the_answer_unchanged(client: openai.OpenAI) -> None:
    plain = answer(client)
    for numbers in (int, float):  # a client library's defaults: 0 penalties, no logprobs, no tools, text
        neutral = {name: next(v for v in f.neutral if type(v) in (numbers, bool, str, dict))
                   for name, f in CHAT_FIELDS.items() if f.neutral}
        defaults = {"frequency_penalty": numbers(0), "presence_penalty": numbers(0), "logprobs": False,
                    "logit_bias": {}, "response_format": {"type": "text"}, "tool_choice": "none"}  # implemented, at values that change nothing
        assert answer(client, **neutral, **defaults) == plain, neutral
    assert set(NO_EFFECT_EXAMPLES) == {n for n, f in CHAT_FIELDS.items() if f.status == "no effect"}
    assert answer(client, **NO_EFFECT_EXAMPLES) == plain
    for name in NO_EFFECT_EXAMPLES:  # still typed
        assert refusal(lambda: answer(client, **{name: 12345})).param == name


def test_sampling_fields_equal_the_api(client: openai.OpenAI, demo_model) -> None:
    """top_k, top_p and repetition_penalty change the answer as they change the API's: top_k 1 and a tiny top_p
    leave only the greedy token, where temperature 1 alone samples another answer."""
    def both(**options) -> str:
        served = client.chat.completions.create(model="muomni", messages=QUESTION, max_tokens=12,
                                                extra_body={"ignore_eos": True, **options}).choices[0].message.content
        api = demo_model.answer(QUESTION[0]["content"], max_new_tokens=12, ignore_eos=True, **options).text
        assert served == api, options
        return served
    greedy = both()
    assert both(temperature=1.0, seed=1) != greedy
    assert both(temperature=1.0, seed=1, top_k=1) == greedy
    assert both(temperature=1.0, seed=1, top_p=0.01) == greedy
    assert both(temperature=1.5, seed=3, top_k=3) not in (greedy, both(temperature=1.5, seed=3))
    assert both(temperature=1.5, seed=1, top_p=0.5) != both(temperature=1.5, seed=1, top_p=0.99)
    assert both(repetition_penalty=2.0) != greedy


# ------------------------------------------------------------------ speech

MAGIC = {"mp3": (b"ID3", b"\xff\xf3", b"\xff\xfb"), "opus": (b"OggS",), "aac": (b"\xff\xf1", b"\xff\xf9"),
         "flac": (b"fLaC",), "wav": (b"RIFF",)}


def decoded(data: bytes) -> tuple[np.ndarray, int, str]:
    """(mono float samples, decoder's rate, codec) of a compressed file, through PyAV."""
    import av
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        frames = [f.to_ndarray().reshape(-1) for f in container.decode(stream)]
        return np.concatenate(frames), stream.codec_context.sample_rate, stream.codec_context.name


def test_speech_formats_and_speed(client: openai.OpenAI, served: Served) -> None:
    def speech(**fields) -> bytes:
        return client.audio.speech.create(model="muomni", voice="alloy", input="Hello there my friend",
                                          **fields).content
    wav = speech(response_format="wav")
    pcm = np.frombuffer(speech(response_format="pcm"), "<i2")
    import soundfile as sf
    samples, rate = sf.read(io.BytesIO(wav), dtype="int16")
    assert rate == 16000 and np.array_equal(samples, pcm)  # pcm: the WAV's samples, raw 16-bit little-endian
    seconds = len(pcm) / 16000
    assert seconds == pytest.approx(1.6)  # 4 words x 5 frames x 80 ms
    for fmt in ("mp3", "opus", "aac", "flac", "wav"):
        data = speech(response_format=fmt)
        assert data.startswith(MAGIC[fmt]), (fmt, data[:8])
        wave, rate, codec = decoded(data)
        assert rate == (48000 if fmt == "opus" else 16000), fmt  # Opus decoders always give 48 kHz
        assert abs(len(wave) / rate - seconds) < 0.1, (fmt, len(wave) / rate)
        assert codec in {"mp3": ("mp3", "mp3float"), "opus": ("opus", "libopus"), "aac": ("aac",),
                         "flac": ("flac",), "wav": ("pcm_s16le",)}[fmt]
        if fmt == "flac":  # lossless: exactly the samples
            assert wave.dtype == np.int16 and np.array_equal(wave, pcm)
    r = httpx.post(f"{served.base}/v1/audio/speech", json={"model": "muomni", "input": "hi", "response_format": "mp3"})
    assert r.headers["content-type"] == "audio/mpeg"
    for speed, factor in ((2.0, 0.5), (0.5, 2.0), (4.0, 0.25), (0.25, 4.0)):
        fast = np.frombuffer(speech(response_format="pcm", speed=speed), "<i2")
        assert abs(len(fast) / 16000 - seconds * factor) < 0.05 * seconds * factor, (speed, len(fast))
    assert speech(response_format="wav", speed=1) == wav
    for speed in (0.2, 4.5, 0):
        assert refusal(lambda: speech(speed=speed)).param == "speed"
    assert refusal(lambda: speech(response_format="ogg")).param == "response_format"
    # one voice: any name gives it; what the talker cannot do is refused by name
    assert speech(response_format="wav", extra_body={"voice": "echo"}) == wav
    assert speech(response_format="wav", extra_body={"voice": {"id": "voice_1"}}) == wav
    assert speech(response_format="wav", extra_body={"stream_format": "audio"}) == wav
    for name, value in (("instructions", "whisper"), ("stream_format", "sse"), ("frobnicate", 1)):
        err = refusal(lambda: speech(extra_body={name: value}))
        assert err.param == name, err.body
    assert [n for n, f in SPEECH_FIELDS.items() if f.status == "refused"] == ["stream_format", "instructions"]


def test_spoken_answer_formats(client: openai.OpenAI) -> None:
    import base64

    def spoken(fmt: str) -> bytes:
        resp = client.chat.completions.create(model="muomni", messages=QUESTION, modalities=["text", "audio"],
                                              audio={"voice": "alloy", "format": fmt})
        return base64.b64decode(resp.choices[0].message.audio.data)
    pcm = np.frombuffer(spoken("pcm16"), "<i2")
    assert len(pcm) > 0
    for fmt in ("mp3", "flac"):
        data = spoken(fmt)
        assert data.startswith(MAGIC[fmt])
        wave, rate, _ = decoded(data)
        assert rate == 16000 and abs(len(wave) - len(pcm)) < 0.1 * 16000
    err = refusal(lambda: spoken("ogg"))
    assert err.param == "audio.format"


# ------------------------------------------------------------------ transcription

def test_streamed_transcription(client: openai.OpenAI, served: Served) -> None:
    with WAV.open("rb") as f:
        whole = client.audio.transcriptions.create(model="muomni", file=f).text
    with WAV.open("rb") as f:
        events = list(client.audio.transcriptions.create(model="muomni", file=f, stream=True))
    assert [e.type for e in events] == ["transcript.text.delta"] * (len(events) - 1) + ["transcript.text.done"]
    assert len(events) >= 2 and "".join(e.delta for e in events[:-1]) == events[-1].text == whole
    with WAV.open("rb") as f:  # the streaming switch off is the plain answer
        assert client.audio.transcriptions.create(model="muomni", file=f, stream=False).text == whole
    r = httpx.post(f"{served.base}/v1/audio/transcriptions", files={"file": ("a.wav", WAV.read_bytes())},
                   data={"stream": "true"}, timeout=60)
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.startswith('data: {"type": "transcript.text.delta"') and r.text.endswith("\n\n")
    for data in ({"stream": "yes"}, {"stream": "true", "response_format": "srt"}):
        r = httpx.post(f"{served.base}/v1/audio/transcriptions", files={"file": ("a.wav", WAV.read_bytes())},
                       data=data, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream", r.text


def test_timestamp_granularities(client: openai.OpenAI, served: Served) -> None:
    def verbose(**fields):
        with WAV.open("rb") as f:
            return client.audio.transcriptions.create(model="muomni", file=f, response_format="verbose_json",
                                                      **fields)
    default = verbose()
    assert default.segments and default.words and all(s.words for s in default.segments)
    words = verbose(timestamp_granularities=["word"])
    assert words.segments is None and words.words == default.words
    segments = verbose(timestamp_granularities=["segment"])
    assert segments.words is None and [s.text for s in segments.segments] == [s.text for s in default.segments]
    assert all(getattr(s, "words", None) is None for s in segments.segments)  # no word alignment asked for
    both = verbose(timestamp_granularities=["word", "segment"])
    assert both.words == default.words and both.segments == default.segments
    assert refusal(lambda: verbose(timestamp_granularities=["char"])).param == "timestamp_granularities"
    with WAV.open("rb") as f:
        err = refusal(lambda: client.audio.transcriptions.create(model="muomni", file=f, response_format="json",
                                                                 timestamp_granularities=["word"]))
    assert err.param == "timestamp_granularities"


def test_transcription_fields_refused_by_name(client: openai.OpenAI, served: Served) -> None:
    examples = {"language": "en", "prompt": "colours", "temperature": 0.2, "include": ["logprobs"],
                "chunking_strategy": "auto", "keywords": ["red"], "languages": ["en"],
                "known_speaker_names": ["a"], "known_speaker_references": ["data:audio/wav;base64,AA=="]}
    refused = [n for n, f in TRANSCRIPTION_FIELDS.items() if f.status == "refused"]
    assert sorted(refused) == sorted(examples)
    for name in refused:
        with WAV.open("rb") as f:
            err = refusal(lambda: client.audio.transcriptions.create(model="muomni", file=f,
                                                                     extra_body={name: examples[name]}))
        assert err.param == name and TRANSCRIPTION_FIELDS[name].note in err.message, err.body
    r = httpx.post(f"{served.base}/v1/audio/transcriptions", files={"file": ("a.wav", WAV.read_bytes())},
                   data={"frobnicate": "1"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate", r.text

