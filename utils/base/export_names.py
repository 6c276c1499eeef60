"""The names of a merged export (spec §1) that its readers, its writer and export.py's command line share: plain
constants, so the command line knows them without importing the (torch) export library."""

EXPORT_NAMES = ("model.safetensors", "muomni.safetensors", "omni.safetensors")  # the weights file, first found wins
DEFAULT_OUTPUT_FILE = EXPORT_NAMES[0]
# Components attribute -> key prefix in model.safetensors (spec §1), in the order they are written.
COMPONENT_PREFIXES = {"thinker": "thinker", "proj_a": "proj_a", "proj_v": "proj_v", "audio": "audio_encoder",
                      "ctc_head": "ctc_head", "vision": "vision_encoder", "talker": "talker", "rvq": "rvq",
                      "vocoder": "vocoder", "ocr": "ocr"}
# export.py's --<flag> -> the directory kind it names (as utils.weights.loading.dir_kind names it)
COMPONENT_FLAGS = {"omni_ckpt": "omni", "thinker_ckpt": "thinker", "audio_ckpt": "audio", "vision_ckpt": "vision",
                   "talker_ckpt": "talker", "vocoder_ckpt": "vocoder", "ocr_ckpt": "ocr"}
QUANT_METHOD = "int8_weight_only_per_channel"  # int8 Linear weights, one float32 scale per output channel
