"""push_to_hub against a local HTTP endpoint (HF_ENDPOINT) that records what huggingface_hub sends:
the repository creation, the files and the commit. The server answers only on 127.0.0.1, keeps at
most a few MB of requests, and stops by itself after a minute if a test leaves it running."""
import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import qlora
from tiny_models import save_tiny

MAX_RECORDED_BYTES = 16 * 2**20


class _Recorder(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass

    def _reply(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _record(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(length, MAX_RECORDED_BYTES)) if length else b""
        server = self.server
        if server.recorded_bytes + len(body) <= MAX_RECORDED_BYTES:
            server.requests.append((self.command, self.path, body))
            server.recorded_bytes += len(body)
        return body

    def do_GET(self):
        self._record()
        self._reply(404, {"error": f"not served: {self.path}"})

    def do_POST(self):
        body = self._record()
        if self.path == "/api/repos/create":
            name = json.loads(body)
            self._reply(200, {"url": f"http://127.0.0.1/{name.get('organization')}/{name['name']}"})
        elif self.path == "/api/validate-yaml":  # huggingface_hub checks a README's metadata block first
            self._reply(200, {})
        elif "/preupload/" in self.path:
            files = json.loads(body)["files"]
            self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                        for f in files]})
        elif "/commit/" in self.path:
            self._reply(200, {"commitUrl": "http://127.0.0.1/me/model/commit/" + "a" * 40, "commitOid": "a" * 40})
        else:
            self._reply(404, {"error": f"not served: {self.path}"})


@pytest.fixture
def hub(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.requests, server.recorded_bytes = [], 0
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    stop = threading.Timer(60, server.shutdown)  # bounded even if the test hangs
    stop.daemon = True
    stop.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        yield server
    finally:
        stop.cancel()
        server.shutdown()
        server.server_close()


def _commit(server):
    """(header, {path: bytes}) of the one commit the server received (NDJSON, inline base64 files)."""
    commits = [body for method, path, body in server.requests if method == "POST" and "/commit/" in path]
    assert len(commits) == 1, [(m, p) for m, p, _ in server.requests]
    lines = [json.loads(line) for line in commits[0].decode().splitlines() if line.strip()]
    header = next(line["value"] for line in lines if line["key"] == "header")
    files = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines if line["key"] == "file"}
    return header, files


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory):
    path = save_tiny("llama", tmp_path_factory.mktemp("hub") / "dense", dtype=torch.float32)
    return qlora.load_model(path, qlora.Int8Config(compute_dtype=torch.float32), device="cpu", progress=False)


def test_push_a_loaded_8bit_model(hub, int8_model, tmp_path):
    url = qlora.push_to_hub(int8_model, "me/model-8bit", token="hf_test")
    assert url.endswith("a" * 40)
    creates = [json.loads(body) for method, path, body in hub.requests if path == "/api/repos/create"]
    assert creates and creates[0]["name"] == "model-8bit" and creates[0]["organization"] == "me"
    assert any("/api/models/me/model-8bit/preupload/main" in path for _, path, _ in hub.requests)
    header, files = _commit(hub)
    assert header["summary"] == "Upload an 8-bit (LLM.int8) model with qlora"
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert json.loads(files["config.json"])["quantization_config"]["load_in_8bit"] is True
    card = files["README.md"].decode()
    assert "LLM.int8" in card and "outlier threshold 6.0" in card and "- 8-bit" in card
    # What was sent is a checkpoint qlora loads back to the same layers.
    (tmp_path / "sent").mkdir()
    for name, data in files.items():
        (tmp_path / "sent" / name).write_bytes(data)
    again = qlora.load_model(tmp_path / "sent", qlora.Int8Config(compute_dtype=torch.float32), device="cpu",
                             progress=False)
    tokens = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, int8_model(tokens).logits)


def test_push_a_directory_adds_a_card_without_touching_it(hub, tmp_path):
    path = save_tiny("llama", tmp_path / "dense", dtype=torch.float32)
    model = qlora.load_model(path, device="cpu", progress=False)
    out = qlora.save_model(model, tmp_path / "nf4")
    before = sorted(p.name for p in out.iterdir())
    qlora.push_to_hub(out, "me/model-nf4", token="hf_test", commit_message="first upload")
    assert sorted(p.name for p in out.iterdir()) == before  # no README written into the user's directory
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".nf4.push.")]  # staging removed
    header, files = _commit(hub)
    assert header["summary"] == "first upload"
    assert "NF4 (bitsandbytes' 4-bit layout), double quant True" in files["README.md"].decode()


def test_export_card_names_the_merged_base(tmp_path):
    config = {"quantization_config": {"load_in_8bit": True, "llm_int8_threshold": 6.0, "llm_int8_skip_modules": ["lm_head"]},
              "qlora_merge": {"base": "dequantized", "base_model": "org/base", "adapter": "run/adapter",
                              "quantization": {"format": "int8"},
                              "int8_added_logit_error": {"max_abs": 0.02, "mean_abs": 0.003, "reference_logit_std": 0.2}}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    card = qlora.hub.model_card(tmp_path)
    assert "base_model: org/base" in card and "merged into dequant(quantized W)" in card
    assert "quantized as `int8`" in card and "logit error of max 0.02" in card


def test_offline_fails_fast(monkeypatch, int8_model):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set"):
        qlora.push_to_hub(int8_model, "me/model", token="hf_test")
    assert time.monotonic() - start < 1.0


def test_unreachable_endpoint_fails_with_a_clear_error(monkeypatch, int8_model):
    import socket

    from huggingface_hub import constants

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="pushing to me/model failed"):
        qlora.push_to_hub(int8_model, "me/model", token="hf_test")
    assert time.monotonic() - start < 30


def test_bad_repo_id():
    with pytest.raises(ValueError, match="repo_id must be '<user or organisation>/<name>'"):
        qlora.push_to_hub("somewhere", "no-namespace")


def test_cli_export_pushes_the_merged_model(hub, tmp_path, capsys):
    from qlora.cli import main
    from test_export import make_run
    from tiny_run import save_tiny_model_with_tokenizer

    base = save_tiny_model_with_tokenizer(tmp_path / "base")
    run = make_run(tmp_path / "run", base, steps=1)
    assert main(["export", f"run_dir={run}", f"out={tmp_path / 'merged'}", "progress=false",
                 "push_to_hub=me/merged"]) == 0
    assert "pushed to me/merged" in capsys.readouterr().out
    header, files = _commit(hub)
    assert header["summary"] == "Upload a merged model with qlora"
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(files)
    assert "merged into **dequant(NF4(W))**" in files["README.md"].decode()
