"""``compat.*.from_pretrained`` the way users call it, against a local stand-in for the Hub.

Each case runs in a fresh interpreter with the user's environment: no ``HF_HUB_OFFLINE`` (the test
suite sets it for itself), ``HF_ENDPOINT`` pointing at ``tests/_fake_hub.py``'s server on 127.0.0.1
(or at a closed port: the Hub unreachable), ``HF_HOME`` in a temporary directory. huggingface_hub
reads these when it is imported, which is why a subprocess is needed. ``from_local`` is replaced
by a recorder in these cases (the files are small stand-ins); loading a real downloaded
checkpoint from the cache is in test_compat.py.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from _fake_hub import COMMIT, FakeHub

pytest.importorskip("huggingface_hub")

TESTS = Path(__file__).resolve().parents[1]

ENGLISH = ["ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json", "conds.pt"]
MULTILINGUAL = ["ve.pt", "t3_mtl23ls_v2.safetensors", "s3gen.pt", "grapheme_mtl_merged_expanded_v1.json", "conds.pt",
                "Cangjie5_TC.json"]
TURBO = ["t3_turbo_v1.safetensors", "s3gen_meanflow.safetensors", "ve.safetensors", "vocab.json", "merges.txt",
         "conds.pt"]
NANO = ["t3_nano_v1.safetensors", "s3gen_meanflow.safetensors", "ve.safetensors", "tokenizer.json", "conds.pt"]
# Files on the Hub that a loader must not fetch.
EXTRA = {"ResembleAI/chatterbox": ["t3_mtl23ls_v3.safetensors", "pack_zh.safetensors", "README.md", "big.bin"],
         "ResembleAI/chatterbox-turbo": ["README.md", "big.bin"],
         "ResembleAI/chatterbox-nano": ["README.md"]}

CASES = {
    # id: (loader expression, repository, files it must download)
    "english": ("compat.ChatterboxTTS.from_pretrained('cpu')", "ResembleAI/chatterbox", ENGLISH),
    "multilingual": ("compat.ChatterboxMultilingualTTS.from_pretrained('cpu')", "ResembleAI/chatterbox",
                     MULTILINGUAL),
    "multilingual-v3": ("compat.ChatterboxMultilingualTTS.from_pretrained('cpu', t3_model='v3')",
                        "ResembleAI/chatterbox", [f.replace("_v2", "_v3") for f in MULTILINGUAL]),
    "language-pack": ("compat.ChatterboxMultilingualTTS.from_pretrained('cpu', t3_model='pack_zh.safetensors')",
                      "ResembleAI/chatterbox",
                      [f.replace("t3_mtl23ls_v2", "pack_zh") for f in MULTILINGUAL]),
    "turbo": ("compat.ChatterboxTurboTTS.from_pretrained('cpu')", "ResembleAI/chatterbox-turbo", TURBO),
    "nano": ("compat.ChatterboxTurboTTS.from_pretrained('cpu', nano=True)", "ResembleAI/chatterbox-nano", NANO),
    "vc": ("compat.ChatterboxVC.from_pretrained('cpu')", "ResembleAI/chatterbox", ["s3gen.safetensors", "conds.pt"]),
}

# Run in the child: record what from_local receives instead of loading it, for each loader in turn.
CHILD = """
import json, os, sys
from chatterbox_rt import compat

seen = {}

def recorder(cls, ckpt_dir, device, *args, **kwargs):
    seen.update(cls=cls.__name__, dir=str(ckpt_dir), files=sorted(os.listdir(ckpt_dir)),
                args=[str(a) for a in args], kwargs={k: str(v) for k, v in kwargs.items()})
    return "loaded"

for cls in (compat.ChatterboxTTS, compat.ChatterboxMultilingualTTS, compat.ChatterboxTurboTTS, compat.ChatterboxVC):
    cls.from_local = classmethod(recorder)
results = []
for expr, cache in json.loads(sys.argv[1]):
    seen.clear()
    os.environ["HF_HUB_CACHE"] = cache  # one cache per loader (read by compat at call time)
    try:
        results.append(dict(result=eval(expr), **seen))
    except Exception as e:
        results.append(dict(error=type(e).__name__, message=str(e)))
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def hub_repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    repos = {}
    for _, repo, files in CASES.values():
        d = root / repo.replace("/", "--")
        d.mkdir(exist_ok=True)
        for name in files + EXTRA[repo]:
            (d / name).write_bytes(f"stand-in for {repo}/{name}\n".encode())
        repos[repo] = d
    return repos


def user_env(home: Path, endpoint: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), PYTHONPATH=str(TESTS), **extra)
    return env


def run_child(cases: list, env: dict) -> dict:
    """Every loader of ``cases`` in one fresh interpreter, each with its own cache under HF_HOME
    -> {case: outcome}."""
    jobs = [(CASES[c][0], str(Path(env["HF_HOME"]) / c)) for c in cases]
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(zip(cases, json.loads(r.stdout.strip().splitlines()[-1]), strict=True))


def closed_port() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused at once
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def online(hub_repos, tmp_path_factory):
    """Every loader run once against the stand-in Hub (an empty cache), then again with the
    cache populated: with HF_HUB_OFFLINE, and with the Hub gone and no flag."""
    home = tmp_path_factory.mktemp("hf-home")
    with FakeHub(hub_repos) as hub:
        first = run_child(list(CASES), user_env(home, hub.url))
        requests = list(hub.requests)
    offline = run_child(list(CASES), user_env(home, closed_port(), HF_HUB_OFFLINE="1"))
    unreachable = run_child(list(CASES), user_env(home, closed_port()))
    return home, first, requests, offline, unreachable


@pytest.fixture(scope="module")
def empty_cache(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf-empty")
    return (home, run_child(list(CASES), user_env(home, closed_port())),
            run_child(list(CASES), user_env(home, closed_port(), HF_HUB_OFFLINE="1")))


@pytest.mark.parametrize("case", list(CASES))
def test_from_pretrained_downloads_online(case, online):
    home, first, requests, _, _ = online
    expr, repo, files = CASES[case]
    out = first[case]
    assert "error" not in out, out
    assert out["result"] == "loaded"
    assert sorted(files) == out["files"], f"{case}: got {out['files']}, expected {sorted(files)}"
    cache = Path(out["dir"])
    assert cache.is_relative_to(home / case)
    assert cache.name == COMMIT and f"models--{repo.replace('/', '--')}" in cache.parts
    assert len(list((cache.parents[1] / "blobs").iterdir())) == len(files)  # nothing else fetched
    fetched = {r.split("/resolve/")[1].split("/", 1)[1] for r in requests
               if r.startswith("GET") and f"/{repo}/resolve/" in r}
    assert set(files) <= fetched, f"{case}: fetched {sorted(fetched)}"
    for name in files:
        assert (cache / name).read_text() == f"stand-in for {repo}/{name}\n"
    if case.startswith("multilingual") or case == "language-pack":
        want_t3 = {"multilingual": "t3_mtl23ls_v2.safetensors", "multilingual-v3": "t3_mtl23ls_v3.safetensors",
                   "language-pack": "pack_zh.safetensors"}[case]
        assert out["kwargs"].get("t3_model") == want_t3


@pytest.mark.parametrize("case", list(CASES))
def test_from_pretrained_uses_a_populated_cache(case, online):
    """With HF_HUB_OFFLINE, and with the Hub gone and no flag, the loader gets the cached files."""
    _, first, _, offline, unreachable = online
    for outcome in (offline[case], unreachable[case]):
        assert outcome.get("result") == "loaded", outcome
        assert outcome["dir"] == first[case]["dir"] and outcome["files"] == first[case]["files"]


@pytest.mark.parametrize("case", list(CASES))
def test_from_pretrained_without_cache_says_so(case, empty_cache):
    """No network and nothing cached: the clear 'not in the local cache' error, with and without
    HF_HUB_OFFLINE, never huggingface_hub's traceback."""
    home, unreachable, offline = empty_cache
    _, repo, _ = CASES[case]
    for outcome, why in ((unreachable[case], "could not be reached"), (offline[case], "HF_HUB_OFFLINE is set")):
        assert outcome.get("error") == "CheckpointError", outcome
        msg = outcome["message"]
        assert repo in msg and why in msg and "not in the local Hugging Face cache" in msg, msg
        assert str(home / case) in msg and "from_local" in msg
