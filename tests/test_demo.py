"""`qlora-demo`: quantize, save and reload a random Llama; nothing left in the temporary folder."""
import tempfile

from qlora import demo


def test_demo_runs_and_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    demo.main(["--layers", "1"])
    printed = capsys.readouterr().out
    assert "identical logits = True" in printed and "now removed" in printed
    assert "expected to be large here: the weights are random" in printed  # a figure with its sense of normal
    assert list(tmp_path.iterdir()) == []


def test_demo_keeps_a_given_workdir(tmp_path):
    demo.main(["--layers", "1", "--workdir", str(tmp_path / "kept")])
    assert (tmp_path / "kept" / "nf4" / "config.json").is_file()
