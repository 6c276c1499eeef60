"""One home for the numbers and choice lists that several layers share: token ids, generation defaults, limits
and the names a command line offers. Plain Python with no imports, so argparse (--help, usage errors) never
needs torch to know them."""

BOS_ID, EOS_ID, PAD_ID = 1, 2, 0  # the μOmni tokenizer's special ids (spec §3)

# Generation defaults (a generation_config.json beside the weights overrides them, explicit options override both).
DEFAULT_MAX_NEW_TOKENS = 64
DECODE_ATTENTION = ("causal", "reference")  # the first is the default; "reference" reproduces a defect (spec §4)
DECODE_KERNELS = ("auto", "c", "torch")  # the decode step: C where it applies (utils/engine/native/step.py), or torch
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit value
RANDOM_SEED = -1  # --seed -1: a fresh random seed, as in llama.cpp

# Prompts used when a question comes without text.
IMAGE_PROMPT = "Describe what you see concisely."
AUDIO_PROMPT = "What did you hear?"

# OCR (MUOMNI_OCR §4): the greedy decode's step limit (infer_chat's), and how extracted text joins a chat prompt.
OCR_MAX_LEN = 128
OCR_QUESTION = "{text} (OCR extracted: {ocr})"
OCR_NO_QUESTION = "Extracted text from image: {ocr}. Describe what you see."
OCR_JOIN = "; "  # between the texts of several images in one prompt

# Media.
DEFAULT_VIDEO_FRAMES = 4
MAX_VIDEO_FRAMES = 256  # most frames taken from one video (each becomes an image token)

# Speech out: OpenAI's audio.speech formats ("pcm": raw 16-bit little-endian mono at the model's rate) and speeds.
SPEECH_MEDIA_TYPES = {"wav": "audio/wav", "mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac",
                      "flac": "audio/flac", "pcm": "audio/pcm"}
SPEECH_FORMATS = tuple(SPEECH_MEDIA_TYPES)
SPEECH_SPEEDS = (0.25, 4.0)  # 1 is the talker's own pace; others change the tempo and keep the pitch

# Names offered by the command lines and the API.
DTYPE_NAMES = ("float32", "float16", "bfloat16")
QUANTIZATIONS = ("int8", "int4")  # run-time weight quantization (utils.weights.quant)
VOCODERS = ("auto", "hifigan", "griffin-lim")
DEVICES = ("auto", "cpu", "cuda", "mps")
