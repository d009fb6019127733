"""llama.cpp's command-line tools (llama-perplexity, llama-imatrix, llama-bench, llama-quantize),
built once from the llama.cpp source vendored in the llama-cpp-python sdist of the installed
version, so the tools and the evaluate stage's in-process llama.cpp are the same code.

Where they live: $LLAMAFLOW_LLAMA_CPP_BIN when set (a directory holding the tools, used as-is,
never built), else <cache>/llama.cpp-<version>-<flags digest>/bin with <cache> =
$XDG_CACHE_HOME/llamaflow or ~/.cache/llamaflow. The directory is keyed by the cmake flags too,
because they depend on the CPU features of the installed wheel: two machines sharing a home
directory must not run each other's AVX-512 binaries.

Build flags: GGML_NATIVE off, and the instruction sets the installed wheel's
`llama_print_system_info()` reports turned on one by one, so the tools run the wheel's kernels
and no instruction the wheel does not use. A native build (the wheel's, when pip built it on the
machine) may also enable what the CPU has and the report does not list (AVX512-FP16, say), which
could move the last float bits. `env(wheel_libs=True)` removes that doubt: the tools are linked
against shared libraries of the same source, so they can run on the wheel's own libllama and
libggml instead. Measured here (stories260K f16, -fa off -nr): both ways write the same
--kl-divergence-base file, byte for byte, and print the same statistics.

Concurrency: the build holds an flock on <dir>.lock; a second process waits for it and then finds
the tools built. The tools appear in bin/ only after a complete build (built elsewhere, then
renamed), so a killed build leaves no half-filled bin/.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

TOOLS = ("llama-perplexity", "llama-imatrix", "llama-bench", "llama-quantize")
ENV_BIN = "LLAMAFLOW_LLAMA_CPP_BIN"
PACKAGE = "llama-cpp-python"

# ggml's system-info feature names -> the cmake options that compile them in
_FEATURE_OPTIONS = {
    "AVX": ("GGML_SSE42", "GGML_AVX"), "AVX_VNNI": ("GGML_AVX_VNNI",), "AVX2": ("GGML_AVX2",),
    "F16C": ("GGML_F16C",), "FMA": ("GGML_FMA",), "BMI2": ("GGML_BMI2",),
    "AVX512": ("GGML_AVX512",), "AVX512_VBMI": ("GGML_AVX512_VBMI",),
    "AVX512_VNNI": ("GGML_AVX512_VNNI",), "AVX512_BF16": ("GGML_AVX512_BF16",),
    # ggml's AMX kernels need the tile instructions as well as the int8 ones
    "AMX_INT8": ("GGML_AMX_TILE", "GGML_AMX_INT8"),
    "LLAMAFILE": ("GGML_LLAMAFILE",), "OPENMP": ("GGML_OPENMP",), "REPACK": ("GGML_CPU_REPACK",),
}
_ISA = ("GGML_SSE42", "GGML_AVX", "GGML_AVX_VNNI", "GGML_AVX2", "GGML_F16C", "GGML_FMA",
        "GGML_BMI2", "GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16",
        "GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16", "GGML_LLAMAFILE", "GGML_OPENMP",
        "GGML_CPU_REPACK")


def installed_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"{PACKAGE} is not installed: the llama.cpp tools are built from the "
                           "source of the installed version") from None


def wheel_lib_dir() -> Path:
    """The directory holding the installed wheel's libllama.so and libggml*.so."""
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


def wheel_features() -> set[str]:
    """The CPU features the installed wheel's ggml was compiled with, as its system info lists
    them ("AVX2 = 1 | ...")."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    return {k.strip() for part in info.split("|") if "=" in part
            for k, v in [part.rsplit("=", 1)] if v.strip() == "1"
            for k in [k.split(":")[-1]]}


def cmake_options(features: set[str] | None = None) -> list[str]:
    """The -D options of the build: no network, no tests, no native tuning, the wheel's ISA."""
    features = wheel_features() if features is None else features
    on = {opt for f in features for opt in _FEATURE_OPTIONS.get(f, ())}
    return (["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=OFF",
             "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_CCACHE=OFF",
             # the tools find the libraries copied beside them in bin/
             "-DCMAKE_BUILD_RPATH=$ORIGIN"]
            + [f"-D{o}={'ON' if o in on else 'OFF'}" for o in _ISA])


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llamaflow"


def build_dir(version: str | None = None, options: list[str] | None = None) -> Path:
    version = version or installed_version()
    options = cmake_options() if options is None else options
    digest = hashlib.sha256("\n".join(options).encode()).hexdigest()[:10]
    return cache_root() / f"llama.cpp-{version}-{digest}"


def tool(name: str) -> Path:
    """The path of llama.cpp tool `name` (one of TOOLS), building the tools on first use."""
    if name not in TOOLS:
        raise ValueError(f"unknown llama.cpp tool {name!r}; one of {TOOLS}")
    given = os.environ.get(ENV_BIN)
    if given:
        path = Path(given) / name
        if not path.is_file():
            raise FileNotFoundError(f"{ENV_BIN}={given} has no {name}; unset it to build the "
                                    "tools from the installed llama-cpp-python's source")
        return path
    return ensure_built() / name


def env(wheel_libs: bool = True) -> dict[str, str]:
    """The environment to run a tool in. wheel_libs: load the installed wheel's libllama and
    libggml (the evaluate stage's exact kernels) instead of the ones built beside the tools."""
    e = dict(os.environ)
    if wheel_libs:
        e["LD_LIBRARY_PATH"] = os.pathsep.join(
            [str(wheel_lib_dir())] + [p for p in [e.get("LD_LIBRARY_PATH")] if p])
    return e


def ensure_built() -> Path:
    """bin/ of the tools for the installed version, built under the lock when missing."""
    version, options = installed_version(), cmake_options()
    root = build_dir(version, options)
    bin_dir = root / "bin"
    if all((bin_dir / t).is_file() for t in TOOLS):
        return bin_dir
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root.with_name(root.name + ".lock")):
        if not all((bin_dir / t).is_file() for t in TOOLS):  # another process may have built it
            _build(version, options, root)
    return bin_dir


@contextlib.contextmanager
def _locked(path: Path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks while another process builds
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def check_prerequisites() -> dict[str, str]:
    """cmake, a C/C++ compiler and make (or ninja), else an error that says what to install."""
    found = {"cmake": shutil.which("cmake"),
             "c++": os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++"),
             "cc": os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"),
             "make": shutil.which("make") or shutil.which("ninja")}
    missing = [k for k, v in found.items() if not v]
    if missing:
        raise RuntimeError(f"building llama.cpp's tools needs {', '.join(missing)}: install them "
                           "(Debian/Ubuntu: apt-get install -y cmake g++ make) or point "
                           f"{ENV_BIN} at a directory holding {', '.join(TOOLS)}")
    return found


def _build(version: str, options: list[str], root: Path) -> None:
    found = check_prerequisites()
    # cmake's default generator wants make; where there is only ninja, use that
    generator = [] if Path(found["make"]).name == "make" else ["-G", "Ninja"]
    src = _source(version, root)
    build = root / "build"
    log = root / "build.log"
    jobs = os.environ.get("LLAMAFLOW_BUILD_JOBS") or str(min(os.cpu_count() or 1, 2))
    t0 = time.monotonic()
    with open(log, "a", encoding="utf-8") as f:
        _run(["cmake", "-S", str(src), "-B", str(build), *generator, *options], f, log)
        _run(["cmake", "--build", str(build), "--config", "Release", "-j", jobs,
              "--target", *TOOLS], f, log)
        f.write(f"built in {time.monotonic() - t0:.0f} s\n")
    staged = root / "bin.partial"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    for t in TOOLS:
        shutil.copy2(build / "bin" / t, staged / t)
    for lib in (build / "bin").glob("lib*.so*"):  # the build's own libraries, beside the tools
        shutil.copy2(lib, staged / lib.name, follow_symlinks=False)
    staged.rename(root / "bin")
    _keep_converters(src, converters_dir(version))
    # bin/ is all a run needs (~15 MB); the source, sdist and objects are ~300 MB
    for scratch in ("build", "src", "sdist"):
        shutil.rmtree(root / scratch, ignore_errors=True)


# llama.cpp's Python converters and what they import (a few MB): kept beside the tools
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py")


def converters_dir(version: str | None = None) -> Path:
    return cache_root() / f"llama.cpp-{version or installed_version()}-py"


def converters() -> Path:
    """A directory holding llama.cpp's own convert_hf_to_gguf.py and convert_lora_to_gguf.py (with
    their conversion/ package and gguf-py) of the installed version's vendored source; run them
    with that directory's gguf-py (leave NO_LOCAL_GGUF unset). Extracted from the sdist on first
    use (or kept when the tools are built), under the same kind of lock."""
    version = installed_version()
    dest = converters_dir(version)
    if all((dest / f).exists() for f in CONVERTER_FILES):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest.with_name(dest.name + ".lock")):
        if not all((dest / f).exists() for f in CONVERTER_FILES):
            scratch = dest.with_name(dest.name + ".src")
            shutil.rmtree(scratch, ignore_errors=True)
            try:
                _keep_converters(_source(version, scratch), dest)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    return dest


def _keep_converters(src: Path, dest: Path) -> None:
    if all((dest / f).exists() for f in CONVERTER_FILES):
        return
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in CONVERTER_FILES:
        (shutil.copytree if (src / f).is_dir() else shutil.copy2)(src / f, tmp / f)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _run(cmd: list[str], f, log: Path) -> None:
    f.write("$ " + " ".join(cmd) + "\n")
    f.flush()
    r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        raise RuntimeError(f"{cmd[0]} {cmd[1]} failed (exit {r.returncode}); {log}:\n"
                           + "\n".join(tail))


def _source(version: str, root: Path) -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist of `version`, downloaded with pip."""
    src = root / "src" / "llama.cpp"
    if (src / "CMakeLists.txt").is_file():
        return src
    dl = root / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    sdist = sorted(dl.glob("*.tar.gz"))
    if not sdist:
        r = subprocess.run([sys.executable, "-m", "pip", "download", f"{PACKAGE}=={version}",
                            "--no-binary", ":all:", "--no-deps", "-d", str(dl)],
                           capture_output=True, text=True)
        sdist = sorted(dl.glob("*.tar.gz"))
        if r.returncode or not sdist:
            raise RuntimeError(f"pip could not download the {PACKAGE}=={version} sdist:\n"
                               + (r.stderr or r.stdout)[-2000:])
    _extract_vendored(sdist[0], src)
    return src


def _extract_vendored(sdist: Path, dest: Path) -> None:
    """Only vendor/llama.cpp/ of the sdist, into dest (via a temp dir, then a rename)."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        prefix = f"{top}/vendor/llama.cpp/"
        members = []
        for m in tar.getmembers():
            if m.name.startswith(prefix):
                m.name = m.name[len(prefix):]
                members.append(m)
        tar.extractall(tmp, members=members, filter="data")
    if not (tmp / "CMakeLists.txt").is_file():
        raise RuntimeError(f"{sdist} has no vendor/llama.cpp/CMakeLists.txt")
    tmp.rename(dest)
