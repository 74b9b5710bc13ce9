"""Install upstream Chatterbox HEAD (resemble-ai/chatterbox at 5de7a54, MIT) as the test-only
package ``chatterbox_head``, next to PyPI's ``chatterbox`` (chatterbox-tts 0.1.7).

HEAD is the oracle for what PyPI lacks: Multilingual V3 and the Single Language Pack (no
alignment analyzer, repetition penalty 1.2, the final token's audio dropped) and the Nano loader.
Both releases are the import name ``chatterbox``, so HEAD's ``src/chatterbox`` is unpacked under
another name; its imports are all relative, so it runs unchanged (its own dependencies are the
reference's, installed by the test set-up).

The archive beside this file is ``git archive --prefix=chatterbox-5de7a54/ 5de7a54 src/chatterbox
LICENSE`` of the public repository, kept here because the test machines cannot reach it.

    python tests/oracle/install.py            # into this interpreter's site-packages
"""
from __future__ import annotations

import shutil
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

COMMIT = "5de7a54aa4e5e2baadb0182dde554908b48b85c2"
ARCHIVE = Path(__file__).with_name("chatterbox-5de7a54.tar.gz")
PACKAGE = "chatterbox_head"


def install(site: Path) -> Path:
    target = site / PACKAGE
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(ARCHIVE) as tar:
        tar.extractall(tmp, filter="data")
        root = Path(tmp) / "chatterbox-5de7a54"
        src = root / "src" / "chatterbox"
        (src / "UPSTREAM_COMMIT").write_text(COMMIT + "\n")
        shutil.copy(root / "LICENSE", src / "LICENSE")
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(src, target)
    return target


if __name__ == "__main__":
    where = install(Path(sysconfig.get_paths()["purelib"]))
    print(f"setup: upstream chatterbox {COMMIT[:7]} installed as {PACKAGE} ({where})", file=sys.stderr)
