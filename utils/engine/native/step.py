"""The C decode step (utils/engine/native/step.c): built with the machine's C compiler on first use, loaded with ctypes.

Why: a Thinker decode step through torch is some 150 small ops whose dispatch (2-17 µs each) costs more than
their arithmetic at μOmni sizes; the C step does a whole step (or a whole prompt's prefill) in one call,
reading each weight once per call for all rows (see the C file for the numbers it computes). The Talker, the
reference decode mode, MoE blocks, bfloat16/float16 and int4 weights and non-CPU devices stay on the torch
path.

`native_model(model, kernel, reference, screen)` says which path a generation takes and why: decode_kernel
"auto" takes the C step where it applies, "c" requires it (OmniError naming the reason otherwise), "torch"
never takes it. The library is compiled once per source, compiler, flags and CPU into the cache directory
(`MUOMNI_CACHE_DIR`, else `$XDG_CACHE_HOME/muomni`, else `~/.cache/muomni`; written atomically, as
decode_step-TOOLCHAIN-SOURCE.so), with `$CC` (default `cc`), `-O3 -march=native` and then `$MUOMNI_CFLAGS`:
about a second. Writing a build removes that toolchain's builds of other versions of step.c (see
`remove_stale_builds`). When it loads, the library reports its ABI version and the layout of the structs it
shares with the ctypes declarations below (`mu_abi`); a library that disagrees is rebuilt once, and if it
still disagrees it is not used. Without a compiler, if the build fails or the ABI disagrees, the torch path
runs and the reason is reported (`--verbose`, `--json` timing `decode_kernel`; `--decode_kernel c` is an
error naming it).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import re
import shlex
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path

import torch
from torch import nn

from models.layers import Block, GeluMLP, SwiGLU, weights_key
from models.thinker import ThinkerLM
from utils.base.defaults import DECODE_KERNELS
from utils.base.errors import OmniError
from utils.weights.quant import GreedyHead, Int8Linear

SOURCE = Path(__file__).with_name("step.c")
CFLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno")
COMPILE_TIMEOUT_S = 300


class _Linear(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("n", ctypes.c_int32), ("k", ctypes.c_int32), ("panels", ctypes.c_int32)]


class _Layer(ctypes.Structure):
    _fields_ = [("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p), ("eps1", ctypes.c_float),
                ("eps2", ctypes.c_float), ("qkv", _Linear), ("o", _Linear), ("up", _Linear), ("down", _Linear)]


class _Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in ("n_layers", "d", "heads", "kv_heads", "head_dim", "d_ff",
                                                     "vocab", "gelu", "rope_len", "screen_k")] + [
        ("layers", ctypes.POINTER(_Layer)), ("emb", ctypes.c_void_p), ("norm", ctypes.c_void_p),
        ("eps", ctypes.c_float), ("head", _Linear), ("screen", _Linear), ("screen_x", ctypes.c_float),
        ("screen_c", ctypes.c_float), ("screen_slack", ctypes.c_float), ("cos", ctypes.c_void_p),
        ("rot_sin", ctypes.c_void_p)]


class _Session(ctypes.Structure):
    _fields_ = [("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("layer_stride", ctypes.c_int64),
                ("row_stride", ctypes.c_int64), ("head_stride", ctypes.c_int64), ("columns", ctypes.c_int32),
                ("rows", ctypes.c_int32), ("positions", ctypes.c_int32), ("scratch", ctypes.c_void_p)]


ABI_VERSION = 1  # step.c's MU_ABI_VERSION: bump both when a struct above or an exported signature changes
SHARED_STRUCTS = (_Linear, _Layer, _Model, _Session)  # step.c's mu_linear, mu_layer, mu_model, mu_session

# Build outputs in the cache directory: decode_step-TOOLCHAIN-SOURCE.so, TOOLCHAIN a hash of the compiler's
# version, the flags, the machine and the CPU's features, SOURCE a hash of step.c; being written:
# .decode_step-*.so. Earlier versions wrote native_decode-KEY.so.
BUILD_NAME = re.compile(r"decode_step-([0-9a-f]{12})-([0-9a-f]{12})\.so")
LEGACY_BUILD_NAME = re.compile(r"native_decode-[0-9a-f]{20}\.so")


def struct_layout() -> list[tuple[str, int]]:
    """(what, bytes) for what step.c's mu_abi reports: per shared struct its size, then each field's offset in
    declaration order, as the ctypes declarations above lay them out."""
    out = []
    for struct in SHARED_STRUCTS:
        out.append((f"sizeof {struct.__name__}", ctypes.sizeof(struct)))
        out += [(f"{struct.__name__}.{name}", getattr(struct, name).offset) for name, _ in struct._fields_]
    return out


def abi_mismatch(lib: ctypes.CDLL) -> str | None:
    """Why `lib` cannot be used with the structs declared here (its ABI version or its struct layout differs),
    or None when it agrees."""
    try:
        abi = lib.mu_abi
    except AttributeError:
        return "it has no mu_abi (built from another version of step.c)"
    abi.restype, abi.argtypes = ctypes.c_int32, [ctypes.POINTER(ctypes.c_int32), ctypes.c_int32]
    want = struct_layout()
    got = (ctypes.c_int32 * (len(want) + 1))()  # one more: a longer list in the library shows there
    version = abi(got, len(got))
    if version != ABI_VERSION:
        return f"it speaks ABI {version}, step.py ABI {ABI_VERSION}"
    for (what, expected), have in zip([*want, ("the end of the layout", -1)], got):
        if have != expected:
            return f"{what} is {have} there, {expected} in step.py"
    return None


def cache_dir() -> Path:
    """Where compiled kernels are kept (see the module docstring)."""
    if os.environ.get("MUOMNI_CACHE_DIR"):
        return Path(os.environ["MUOMNI_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "muomni"


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), so a cached -march=native build is not reused on another CPU."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def compile_flags() -> list[str]:
    """CFLAGS, then `MUOMNI_CFLAGS` (e.g. "-march=x86-64-v2" to build for older CPUs than this one)."""
    return [*CFLAGS, *shlex.split(os.environ.get("MUOMNI_CFLAGS", ""))]


def _digest(*parts: bytes) -> str:
    """12 hex digits naming `parts` in a build's file name (collisions are as unlikely as they need to be)."""
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]


class Toolchain:
    """The compiler and flags a build uses, and the build's path in the cache directory."""

    def __init__(self, exe: str, version: str, flags: list[str]) -> None:
        self.exe, self.version, self.flags = exe, version, flags
        key = _digest(version.encode(), " ".join(flags).encode(), platform.machine().encode(), _cpu_flags().encode())
        self.target = cache_dir() / f"decode_step-{key}-{_digest(SOURCE.read_bytes())}.so"


def toolchain() -> Toolchain | str:
    """The toolchain `$CC` (default `cc`) gives with compile_flags(), or why there is none."""
    cc = os.environ.get("CC", "cc")
    exe = shutil.which(cc)
    if exe is None:
        return f"no C compiler ({cc!r} not found; set CC or install gcc)"
    try:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the C compiler {cc!r} does not run ({exc})"
    return Toolchain(exe, version, compile_flags())


def remove_stale_builds(kept: Path) -> None:
    """After `kept` was written: remove the builds of other versions of step.c for the same toolchain (names
    decode_step-TOOLCHAIN-OTHER.so, TOOLCHAIN as in `kept`) and every build of the earlier naming
    (native_decode-KEY.so). Nothing else is touched: builds for other compilers, flags or CPUs stay (another
    environment sharing the directory uses them), and so does every file not named by these patterns. A
    checkout with another step.c that shares the directory rebuilds its own on its next start (a second or so)."""
    mine = BUILD_NAME.fullmatch(kept.name)
    for path in kept.parent.iterdir():
        other = BUILD_NAME.fullmatch(path.name)
        if (other and other[1] == mine[1] and other[2] != mine[2]) or LEGACY_BUILD_NAME.fullmatch(path.name):
            with contextlib.suppress(FileNotFoundError):  # another process removed it first
                path.unlink()


def compile_library(tools: Toolchain, out: str) -> str | None:
    """Compile step.c into `out`; None, or why it failed."""
    try:
        done = subprocess.run([tools.exe, *tools.flags, "-o", out, str(SOURCE), "-lm"], capture_output=True,
                              text=True, timeout=COMPILE_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the C compiler failed on {SOURCE.name}: {exc}"
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["no message"])[0]
        return f"the C compiler failed on {SOURCE.name}: {first}"
    return None


def _open(path: str, what: str) -> tuple[ctypes.CDLL | None, str | None]:
    """(the library at `path` if its ABI agrees, else None; why not, naming it `what`)."""
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        return None, f"cannot load {what} ({exc})"
    why = abi_mismatch(lib)
    return (lib, None) if why is None else (None, f"{what} does not match step.py: {why}")


def _build(tools: Toolchain) -> tuple[ctypes.CDLL | None, str | None]:
    """Compile into a temporary file of the cache directory, load and check it under that name (dlopen would
    hand back an older library already loaded under the target's name), then move it into place and remove
    the stale builds. A library whose ABI disagrees is not kept."""
    out_dir = tools.target.parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".decode_step-", suffix=".so", dir=out_dir)
        os.close(fd)
    except OSError as exc:
        return None, f"cannot write the compiled kernel to {out_dir} ({exc.strerror or exc}; set MUOMNI_CACHE_DIR)"
    try:
        why = compile_library(tools, tmp)
        if why is not None:
            return None, why
        lib, why = _open(tmp, f"a fresh build of {SOURCE.name}")
        if lib is None:
            return None, why
        os.replace(tmp, tools.target)
    except OSError as exc:
        return None, f"cannot write the compiled kernel {tools.target} ({exc.strerror or exc})"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    remove_stale_builds(tools.target)
    return lib, None


def load_library() -> tuple[ctypes.CDLL | None, str]:
    """`library()` without the per-process cache: the cached build if it loads and its ABI agrees, else one
    (re)build; (None, why) if that fails too."""
    tools = toolchain()
    if isinstance(tools, str):
        return None, tools
    lib = None
    if tools.target.exists():
        lib, _ = _open(str(tools.target), f"the compiled kernel {tools.target}")
    if lib is None:  # not built yet, or unusable (a foreign or damaged file, another ABI): build it once
        lib, why = _build(tools)
        if lib is None:
            return None, why
    lib.mu_step.restype = ctypes.c_int
    lib.mu_step.argtypes = [ctypes.POINTER(_Model), ctypes.POINTER(_Session), ctypes.c_int32, ctypes.c_void_p,
                            ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.mu_prefill.restype = ctypes.c_int
    lib.mu_prefill.argtypes = [ctypes.POINTER(_Model), ctypes.POINTER(_Session), ctypes.c_int32, ctypes.c_int32,
                               ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    lib.mu_scratch_bytes.restype = ctypes.c_size_t
    lib.mu_scratch_bytes.argtypes = [ctypes.POINTER(_Model), ctypes.c_int32, ctypes.c_int32, ctypes.c_int32]
    lib.mu_features.restype = ctypes.c_char_p
    lib.mu_f32_panels.restype = ctypes.c_int
    compiler = (tools.version.splitlines() or [tools.exe])[0]
    return lib, f"c ({lib.mu_features().decode()}, {compiler})"


@functools.cache
def library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded C step, "c (FEATURES, COMPILER)"), or (None, why not). Built at most once per process."""
    return load_library()


class Unsupported(Exception):
    """The model (or these options) cannot take the C step; the message says why."""


def _f32(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype != torch.float32 or t.device.type != "cpu":
        raise Unsupported(f"{what} is {t.dtype} on {t.device.type} (the C step takes float32 on the CPU)")
    return t.detach().contiguous()


def to_panels(w: torch.Tensor) -> torch.Tensor:
    """A float32 weight (n, k) as ceil(n / 64) panels (k, 64): row 64 p + l of `w` in column l of panel p, zero
    rows past n (the layout of the C file's linear_panels)."""
    n, k = w.shape
    padded = torch.zeros(-(-n // 64) * 64, k, dtype=w.dtype)
    padded[:n] = w
    return padded.view(-1, 64, k).transpose(1, 2).contiguous()


class NativeView:
    """A NativeModel with one greedy screen (or none): the C struct a session passes to the step."""

    def __init__(self, native: "NativeModel", struct: _Model, keep: list[torch.Tensor]) -> None:
        self.lib, self.vocab, self.struct, self.keep = native.lib, native.vocab, struct, keep
        self.native = native  # what the struct's weight pointers point into
        self.ref = ctypes.byref(struct)


class NativeModel:
    """A Thinker's weights laid out for the C step (fused q/k/v and gate/up copies, float32 weights in panels,
    int8 weights with their sign bit flipped) and the C struct pointing at them. Holds every tensor the struct
    points to; `view(screen)` adds a greedy screen (the int8 copy of the head) without redoing the rest."""

    def __init__(self, lib: ctypes.CDLL, model: ThinkerLM) -> None:
        self.lib, self.keep = lib, []
        blocks = list(model.blocks)
        if not blocks:
            raise Unsupported("a thinker without blocks")
        first = blocks[0].attn
        h, g, dk = first.n_heads, first.n_kv_heads, first.head_dim
        if dk % 2 or h % g:
            raise Unsupported(f"{h} heads over {g} KV heads of {dk}")
        layers = (_Layer * len(blocks))()
        gelu = isinstance(getattr(blocks[0], "mlp", None), GeluMLP)
        for i, block in enumerate(blocks):
            layers[i] = self._layer(block, i, gelu, (h, g, dk))
        emb = _f32(model.tok_emb.weight, "the token embedding")
        d, vocab = emb.shape[1], emb.shape[0]
        ffn = blocks[0].mlp
        d_ff = ffn.down_proj.in_features if isinstance(ffn, SwiGLU) else ffn.fc2.in_features
        rot = model.rotary
        cos, rot_sin = _f32(rot.cos, "the rotary table"), _f32(rot.rot_sin, "the rotary table")
        self.keep += [layers, emb, cos, rot_sin]
        self.struct = _Model(n_layers=len(blocks), d=d, heads=h, kv_heads=g, head_dim=dk, d_ff=d_ff, vocab=vocab,
                             gelu=int(gelu), rope_len=cos.shape[0], screen_k=0,
                             layers=layers, emb=emb.data_ptr(), norm=self._norm(model.norm, "final norm"),
                             eps=model.norm.eps, head=self._linear([model.lm_head], "lm_head"),
                             cos=cos.data_ptr(), rot_sin=rot_sin.data_ptr())
        self.vocab = vocab
        self.views: "weakref.WeakKeyDictionary[GreedyHead, NativeView]" = weakref.WeakKeyDictionary()
        self.plain = NativeView(self, self.struct, [])

    def view(self, screen: GreedyHead | None) -> NativeView:
        """The struct with `screen` (a float32 head's int8 screen; ignored for an int8 head), built once per
        screen."""
        if screen is None or self.struct.head.scale is not None:
            return self.plain
        hit = self.views.get(screen)
        if hit is None:
            flipped = (screen.qweight.view(torch.uint8) ^ 128).contiguous()
            scale = screen.scale.float().contiguous()
            struct = _Model.from_buffer_copy(self.struct)
            struct.screen = _Linear(flipped.data_ptr(), scale.data_ptr(), None, *flipped.shape)
            struct.screen_k = screen.k
            struct.screen_x = screen.err_max + screen.fp_term
            struct.screen_c = screen.half_n1_max
            struct.screen_slack = GreedyHead.SLACK
            hit = self.views[screen] = NativeView(self, struct, [flipped, scale])
        return hit

    def _norm(self, norm: nn.Module, what: str) -> int:
        w = _f32(norm.weight, what)
        self.keep.append(w)
        return w.data_ptr()

    def _linear(self, mods: list[nn.Module], what: str) -> _Linear:
        """One C linear computing the modules' outputs side by side (all float32 nn.Linear, or all Int8Linear)."""
        panels = 0
        if all(type(m) is nn.Linear for m in mods):
            w = torch.cat([_f32(m.weight, what) for m in mods]) if len(mods) > 1 else _f32(mods[0].weight, what)
            scale = None
            if self.lib.mu_f32_panels():
                w, panels = to_panels(w), 1
        elif all(type(m) is Int8Linear for m in mods):
            w = (torch.cat([m.qweight for m in mods]).view(torch.uint8) ^ 128).contiguous()
            scale = torch.cat([m.scale for m in mods]).float().contiguous()
        else:
            kinds = ", ".join(sorted({type(m).__name__ for m in mods}))
            raise Unsupported(f"{what} is {kinds} (the C step takes float32 or int8 weights)")
        biases = [m.bias for m in mods]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            raise Unsupported(f"{what}: bias on some parts only")
        bias = None if biases[0] is None else torch.cat([_f32(b, what) for b in biases]).contiguous()
        self.keep += [t for t in (w, scale, bias) if t is not None]
        n, k = sum(m.out_features for m in mods), mods[0].in_features
        return _Linear(w.data_ptr(), None if scale is None else scale.data_ptr(),
                       None if bias is None else bias.data_ptr(), n, k, panels)

    def _layer(self, block: Block, i: int, gelu: bool, heads: tuple[int, int, int]) -> _Layer:
        attn, ffn = block.attn, getattr(block, "mlp", None)
        if ffn is None:
            raise Unsupported("mixture-of-experts blocks")
        if (attn.n_heads, attn.n_kv_heads, attn.head_dim) != heads or isinstance(ffn, GeluMLP) != gelu:
            raise Unsupported("blocks of different shapes")
        where = f"block {i}"
        qkv = [attn.qkv] if attn.fused_qkv else [attn.q, attn.k, attn.v]
        up = [ffn.fc1] if gelu else [ffn.gate_proj, ffn.up_proj]
        down = ffn.fc2 if gelu else ffn.down_proj
        return _Layer(norm1=self._norm(block.norm1, where), norm2=self._norm(block.norm2, where),
                      eps1=block.norm1.eps, eps2=block.norm2.eps, qkv=self._linear(qkv, where),
                      o=self._linear([attn.o], where), up=self._linear(up, where), down=self._linear([down], where))


class NativeSession:
    """The C step bound to one KV cache (models.layers.KVCache) and a scratch buffer for up to `positions`
    positions per call (a prefill's length; at least the cache's rows), both allocated once; `prefill` and
    `step` allocate nothing."""

    def __init__(self, native: NativeView, cache_k: torch.Tensor, cache_v: torch.Tensor, positions: int = 1) -> None:
        if cache_k.dtype != torch.float32 or cache_k.stride() != cache_v.stride() or cache_k.stride(-1) != 1 \
                or cache_k.stride(-2) != cache_k.shape[-1]:
            raise Unsupported("the KV cache layout")
        self.native = native
        rows, columns = cache_k.shape[1], cache_k.shape[3]
        positions = max(rows, positions)
        self.struct = _Session(k=cache_k.data_ptr(), v=cache_v.data_ptr(), layer_stride=cache_k.stride(0),
                               row_stride=cache_k.stride(1), head_stride=cache_k.stride(2), columns=columns,
                               rows=rows, positions=positions)
        self.scratch = torch.empty(native.lib.mu_scratch_bytes(native.ref, rows, positions, columns),
                                   dtype=torch.uint8)
        self.struct.scratch = self.scratch.data_ptr()
        self.keep = (cache_k, cache_v)
        self.ref = ctypes.byref(self.struct)
        self.ids = torch.zeros(rows, dtype=torch.long)
        self.logits = torch.empty(rows, native.vocab)

    def _out(self, rows: int, greedy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.ids[:rows], None if greedy else self.logits[:rows]

    def prefill(self, embeds: torch.Tensor, row: int, first: int, greedy: bool) -> torch.Tensor:
        """Run the prompt `embeds` (n, d) into cache row `row` at columns first..first+n-1. Returns the last
        position's greedy id (1,) with `greedy`, else its logits (1, V): views the next call overwrites."""
        if embeds.dtype != torch.float32 or not embeds.is_contiguous():
            embeds = embeds.to(torch.float32).contiguous()
        ids, logits = self._out(1, greedy)
        rc = self.native.lib.mu_prefill(self.native.ref, self.ref, row, embeds.shape[0], embeds.data_ptr(), first,
                                        None if logits is None else logits.data_ptr(), ids.data_ptr())
        if rc:
            raise ValueError(f"a prompt of {embeds.shape[0]} positions at column {first} of row {row} does not fit "
                             f"the cache or the session")
        return ids if greedy else logits

    def step(self, tokens: torch.Tensor, pos: int, first: torch.Tensor | None, greedy: bool) -> torch.Tensor:
        """Feed `tokens` (B,) at cache column `pos` (row b's sequence starts at column first[b]; None: 0). Returns
        the greedy ids (B,) with `greedy`, else the logits (B, V): views of buffers the next step overwrites."""
        rows = tokens.shape[0]
        if tokens.dtype != torch.long or not tokens.is_contiguous():
            tokens = tokens.to(torch.long).contiguous()
        ids, logits = self._out(rows, greedy)
        rc = self.native.lib.mu_step(self.native.ref, self.ref, rows, tokens.data_ptr(), pos,
                                     None if first is None else first.data_ptr(),
                                     None if logits is None else logits.data_ptr(), ids.data_ptr())
        if rc:
            raise ValueError("token id outside the vocabulary" if rc == -1 else
                             f"cache column {pos} outside the cache (or before a row's first column)")
        return ids if greedy else logits


_MODELS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, NativeModel]]" = weakref.WeakKeyDictionary()


def native_model(model: nn.Module, kernel: str, reference: bool, screen: GreedyHead | None
                 ) -> tuple[NativeView | None, str]:
    """(the C step's view of `model` with `screen`, "c (...)"), or (None, "torch (why)") — the decode path a
    generation with decode_kernel `kernel` takes. `kernel` "c" raises OmniError instead of falling back. The
    weights are laid out once per weight version."""
    if kernel not in DECODE_KERNELS:
        raise ValueError(f"decode_kernel {kernel!r}: use one of {', '.join(DECODE_KERNELS)}")
    if kernel == "torch":
        return None, "torch (asked for)"
    reason = None
    if reference:
        reason = "the reference decode mode"
    elif not isinstance(model, ThinkerLM):
        reason = f"a {type(model).__name__}"
    elif model.tok_emb.weight.device.type != "cpu":
        reason = f"device {model.tok_emb.weight.device.type}"
    lib, detail = library() if reason is None else (None, reason)
    if lib is None:
        reason = detail
    else:
        key = weights_key([model])
        hit = _MODELS.get(model)
        if hit is not None and hit[0] == key:
            return hit[1].view(screen), detail
        try:
            native = NativeModel(lib, model)
        except Unsupported as exc:
            reason = str(exc)
        else:
            _MODELS[model] = (key, native)
            return native.view(screen), detail
    if kernel == "c":
        raise OmniError(f"--decode_kernel c: the C decode step cannot run here: {reason}")
    return None, f"torch ({reason})"
