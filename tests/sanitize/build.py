"""Builds attnkit._C with AddressSanitizer + UndefinedBehaviorSanitizer into a
separate directory (default build/asan/), never over the in-place
python/attnkit/_C*.so that the normal test runs use. `make test-asan` then
points ATTNKIT_EXTENSION_DIR at that directory (see attnkit._extensions).

torch.utils.cpp_extension.load compiles with ninja, incrementally, from the
same csrc/cpu/*.cpp that setup.py builds, so setup.py stays untouched."""
import glob
import os
import sys

from torch.utils.cpp_extension import load

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# -O1 keeps stack traces readable and the tests fast enough; frame pointers for ASan's unwinder.
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined", "-g", "-O1"]


def main() -> None:
    out = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build", "asan"))
    os.makedirs(out, exist_ok=True)
    load(
        name="_C",  # TORCH_EXTENSION_NAME: the module must import as attnkit._C
        sources=sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))),
        extra_include_paths=[os.path.join(ROOT, "csrc", "include")],
        extra_cflags=SANITIZE + ["-fopenmp"],
        extra_ldflags=["-fsanitize=address,undefined", "-fopenmp"],
        build_directory=out,
        verbose=False,
    )
    print(f"sanitized attnkit._C built in {out}")


if __name__ == "__main__":
    main()
