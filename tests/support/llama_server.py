"""llama.cpp's `llama-server`, built from source, on a random-weight model: a real engine for tests.

Why this shape: the gateway must meet a real inference engine (continuous batching, a KV cache,
its own `/metrics` and `/slots`), and CI machines have CPUs, no weights and no prebuilt binary.
The `llama-cpp-python` sdist on PyPI vendors the whole llama.cpp tree, so we pin one version,
build only the `llama-server` target (static, CPU only, no network at build time), and write a
small llama-architecture GGUF with random weights, its tokenizer copied from a vocabulary-only
GGUF in the same tree. Its text is noise; its timing, batching, KV cache and metrics are the
engine's own.

    build = ensure_llama_server()              # downloads and builds once per version
    model = ensure_model(build)                # writes the GGUF once, next to the binary
    with LlamaServer(build, model, parallel=2) as server:
        server.url                             # http://127.0.0.1:<free port>, healthy

Everything lands in `~/.cache/inference-scheduler/llama-server-<version>-<digest>/` (the
digest is of the build options; or under `$INFERENCE_SCHEDULER_CACHE`): the build runs in a
temporary directory beside it and is renamed into place whole, under a file lock, so a second
run (or a concurrent pytest process) reuses it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from backends.redis.embedded import free_port

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PYPI_JSON_URL = "https://pypi.org/pypi/llama-cpp-python/json"
VOCAB_NAME = "ggml-vocab-llama-spm.gguf"

# Only the server target, statically linked (the binary survives the rename of its build
# directory), CPU only. The UI assets would be fetched from Hugging Face or built with npm:
# both off, the server embeds none. OpenSSL is for HTTPS model downloads we never make;
# OpenMP's spinning worker threads would fight everyone else for the 2 cores.
#
# Build time (CI builds it on every fresh machine): ggml, the tensor kernels that decide the
# engine's speed, keeps -O3 (GGML_OPTIMIZED_FLAGS, set in ggml's own project scope through
# CMAKE_PROJECT_ggml_INCLUDE); the rest (the server, its JSON, chat templates and HTTP,
# multimodal code it links but we never call, the model loader and sampler) is most of the
# compile time and runs per request or per token, not per multiply: -O1 there. GGML_NATIVE
# (the default) builds one CPU variant for this machine, not GGML_CPU_ALL_VARIANTS' dozen;
# the cache lives on the machine that built it. A unity build does not compile (upstream's
# common/ and ggml-cpu/ sources clash when merged). Measured in the report of issue 15.
OTHER_FLAGS = "-O1 -DNDEBUG"
GGML_OPTIMIZED_FLAGS = "-O3 -DNDEBUG"
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    f"-DCMAKE_C_FLAGS_RELEASE={OTHER_FLAGS}",
    f"-DCMAKE_CXX_FLAGS_RELEASE={OTHER_FLAGS}",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_LLGUIDANCE=OFF",
    "-DGGML_NATIVE=ON",
    "-DGGML_OPENMP=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
    "-DGGML_RPC=OFF",
)
GGML_PROJECT_INCLUDE = (
    f'set(CMAKE_C_FLAGS_RELEASE "{GGML_OPTIMIZED_FLAGS}")\n'
    f'set(CMAKE_CXX_FLAGS_RELEASE "{GGML_OPTIMIZED_FLAGS}")\n'
)


def build_key() -> str:
    """The cache directory's name: the pinned version and a digest of how it is built, so a
    change of options builds anew instead of reusing a binary built otherwise."""
    recipe = "\n".join((*CMAKE_OPTIONS, GGML_PROJECT_INCLUDE))
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:8]
    return f"llama-server-{LLAMA_CPP_PYTHON_VERSION}-{digest}"


Log = Callable[[str], None]


def _quiet(message: str) -> None:
    del message


class LlamaServerError(Exception):
    """The engine could not be built, or did not become healthy."""


@dataclasses.dataclass(frozen=True)
class LlamaBuild:
    """A built `llama-server` and the vocabulary GGUF of the same source tree."""

    directory: Path
    version: str

    @property
    def binary(self) -> Path:
        return self.directory / "bin" / "llama-server"

    @property
    def vocab(self) -> Path:
        return self.directory / VOCAB_NAME

    def is_complete(self) -> bool:
        return self.binary.is_file() and self.vocab.is_file()


def cache_root() -> Path:
    configured = os.environ.get("INFERENCE_SCHEDULER_CACHE")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "inference-scheduler"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes (flock: released by the kernel if we die)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_llama_server(
    root: Path | None = None, *, jobs: int = 2, log: Log = _quiet
) -> LlamaBuild:
    """The cached build for the pinned version, building it first if there is none."""
    root = root or cache_root()
    build = LlamaBuild(root / build_key(), LLAMA_CPP_PYTHON_VERSION)
    if build.is_complete():
        return build
    with file_lock(root / f"{build_key()}.lock"):
        if build.is_complete():  # another process built it while we waited
            return build
        with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as scratch:
            staged = _build_in(Path(scratch), jobs=jobs, log=log)
            shutil.rmtree(build.directory, ignore_errors=True)  # a half-copied leftover
            staged.rename(build.directory)
    return build


def _build_in(scratch: Path, *, jobs: int, log: Log) -> Path:
    started_at = time.monotonic()
    sdist = download_sdist(scratch, log=log)
    source = _extract(sdist, scratch)
    log(f"llama-server: downloaded and unpacked in {time.monotonic() - started_at:.1f} s")
    build_dir = scratch / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []  # else cmake's Makefiles
    ggml_include = scratch / "ggml-flags.cmake"
    ggml_include.write_text(GGML_PROJECT_INCLUDE)
    include = f"-DCMAKE_PROJECT_ggml_INCLUDE={ggml_include}"
    _run(
        ["cmake", "-S", str(source), "-B", str(build_dir), *generator, *CMAKE_OPTIONS, include], log
    )
    compile_at = time.monotonic()
    target = ["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)]
    _run(target, log)
    log(f"llama-server: compiled in {time.monotonic() - compile_at:.1f} s")
    staged = scratch / "staged"
    (staged / "bin").mkdir(parents=True)
    shutil.copy2(build_dir / "bin" / "llama-server", staged / "bin" / "llama-server")
    shutil.copy2(source / "models" / VOCAB_NAME, staged / VOCAB_NAME)
    return staged


def download_sdist(into: Path, *, log: Log = _quiet) -> Path:
    """The pinned sdist from PyPI, its sha256 checked against the pin."""
    with urllib.request.urlopen(PYPI_JSON_URL, timeout=30) as response:
        release = json.load(response)
    files = release["releases"][LLAMA_CPP_PYTHON_VERSION]
    (entry,) = [file for file in files if file["packagetype"] == "sdist"]
    url = urllib.parse.urljoin(PYPI_JSON_URL, str(entry["url"]))
    path = into / str(entry["filename"])
    log(f"llama-server: downloading {entry['filename']} ({entry['size'] / 1e6:.0f} MB)")
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response, path.open("wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != SDIST_SHA256:
        raise LlamaServerError(f"{entry['filename']}: sha256 {digest.hexdigest()} is not the pin")
    return path


def _extract(sdist: Path, into: Path) -> Path:
    """Unpack only the vendored llama.cpp tree."""
    top = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    with tarfile.open(sdist) as archive:
        members = [member for member in archive.getmembers() if member.name.startswith(top)]
        archive.extractall(into, members=members, filter="data")
    return into / top


def _run(command: list[str], log: Log) -> None:
    log("llama-server: " + " ".join(command[:4]) + " ...")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-4000:]
        raise LlamaServerError(f"{command[0]} failed ({done.returncode}):\n{tail}")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A llama-architecture model's size. The default, about 40 M parameters in f16 (80 MB),
    costs a few ms per decode step on 2 cores, like a small real model at a small batch."""

    embedding: int = 512
    layers: int = 8
    heads: int = 8
    kv_heads: int = 4
    feed_forward: int = 1408
    context: int = 4096
    seed: int = 15

    @property
    def file_name(self) -> str:
        return (
            f"random-llama-e{self.embedding}-l{self.layers}-h{self.heads}-kv{self.kv_heads}"
            f"-ff{self.feed_forward}-c{self.context}-s{self.seed}.gguf"
        )


def ensure_model(build: LlamaBuild, shape: ModelShape | None = None) -> Path:
    """The random-weight GGUF of `shape` next to the binary, written first if absent."""
    shape = shape or ModelShape()
    path = build.directory / shape.file_name
    if path.is_file():
        return path
    with file_lock(build.directory / (shape.file_name + ".lock")):
        if not path.is_file():
            partial = path.with_suffix(".partial")
            write_random_model(partial, build.vocab, shape)
            partial.rename(path)
    return path


def write_random_model(path: Path, vocab: Path, shape: ModelShape) -> None:
    """A llama GGUF with random f16 weights and the tokenizer of the `vocab` GGUF."""
    import gguf  # imported here: only the tests that run the engine need it
    import numpy as np

    reader = gguf.GGUFReader(vocab)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("random-llama")
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.embedding)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.feed_forward)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.embedding // shape.heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for name, field in reader.fields.items():
        if name.startswith("tokenizer."):
            _copy_field(writer, name, field)
    rng = np.random.default_rng(shape.seed)
    for name, dims in _tensor_shapes(shape, len(tokens)):
        if name.endswith("norm.weight"):
            writer.add_tensor(name, np.ones(dims, dtype=np.float32))
        else:
            weights = rng.normal(0.0, 0.02, size=dims).astype(np.float16)
            writer.add_tensor(name, weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _copy_field(writer: object, name: str, field: object) -> None:
    import gguf

    assert isinstance(writer, gguf.GGUFWriter) and isinstance(field, gguf.ReaderField)
    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        writer.add_array(name, field.contents())
    else:
        writer.add_key_value(name, field.contents(), kind)


def _tensor_shapes(shape: ModelShape, vocab_size: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and numpy shapes (rows = output features), as llama.cpp loads them."""
    embed, ff = shape.embedding, shape.feed_forward
    kv = embed // shape.heads * shape.kv_heads
    tensors: list[tuple[str, tuple[int, ...]]] = [
        ("token_embd.weight", (vocab_size, embed)),
        ("output_norm.weight", (embed,)),
        ("output.weight", (vocab_size, embed)),
    ]
    for layer in range(shape.layers):
        block = f"blk.{layer}."
        tensors += [
            (block + "attn_norm.weight", (embed,)),
            (block + "attn_q.weight", (embed, embed)),
            (block + "attn_k.weight", (kv, embed)),
            (block + "attn_v.weight", (kv, embed)),
            (block + "attn_output.weight", (embed, embed)),
            (block + "ffn_norm.weight", (embed,)),
            (block + "ffn_gate.weight", (ff, embed)),
            (block + "ffn_up.weight", (ff, embed)),
            (block + "ffn_down.weight", (embed, ff)),
        ]
    return tensors


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """How `llama-server` is started: slots, context, threads, and `--metrics` (on unless
    a test needs a server as llama.cpp starts by default, which publishes none)."""

    parallel: int = 2
    ctx_size: int = 2048
    threads: int = 2
    metrics: bool = True
    extra_args: tuple[str, ...] = ()


class LlamaServer:
    """`with LlamaServer(build, model) as server:` a healthy `llama-server` on a free port."""

    def __init__(
        self,
        build: LlamaBuild,
        model: Path,
        options: ServerOptions | None = None,
        *,
        port: int | None = None,
        startup_timeout_s: float = 60.0,
    ) -> None:
        self.build = build
        self.model = model
        self.options = options or ServerOptions()
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pin(self, cpus: set[int]) -> None:
        """Run every thread of the running server on `cpus` only (Linux)."""
        assert self._process is not None, "pin a started server"
        for task in Path(f"/proc/{self._process.pid}/task").iterdir():
            os.sched_setaffinity(int(task.name), cpus)

    def cpu_s(self) -> float:
        """The CPU time the running server has used, all its threads (Linux)."""
        assert self._process is not None, "ask a started server"
        fields = Path(f"/proc/{self._process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def command(self) -> list[str]:
        options = self.options
        return [
            str(self.build.binary),
            *("--model", str(self.model), "--alias", MODEL_ALIAS),
            *("--host", "127.0.0.1", "--port", str(self.port)),
            *("--parallel", str(options.parallel), "--ctx-size", str(options.ctx_size)),
            *("--threads", str(options.threads), "--threads-batch", str(options.threads)),
            *(("--metrics",) if options.metrics else ()),
            *("--slots", "--no-webui", "--chat-template", "chatml"),
            *options.extra_args,
        ]

    def __enter__(self) -> LlamaServer:
        self._log = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        deadline_at = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline_at:
            assert self._process is not None
            if self._process.poll() is not None:
                raise LlamaServerError(f"llama-server exited: {self.output()[-3000:]}")
            if _is_healthy(self.url):
                return
            time.sleep(0.05)
        raise LlamaServerError(f"llama-server not healthy in {self.startup_timeout_s} s")

    def output(self) -> str:
        """What the server printed so far (its log), for failure messages."""
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None


MODEL_ALIAS = "llama-random"


def _is_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1.0) as response:
            return bool(response.status == 200)
    except OSError:  # refused while starting, or 503 while the model loads
        return False


__all__ = [
    "LLAMA_CPP_PYTHON_VERSION",
    "MODEL_ALIAS",
    "LlamaBuild",
    "LlamaServer",
    "LlamaServerError",
    "ModelShape",
    "ServerOptions",
    "ensure_llama_server",
    "ensure_model",
]
