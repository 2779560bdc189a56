"""Every command, driven with a bad value for every key it reads: one `error:` line (no traceback), a
non-zero exit, nothing written. The table is the promise of the README's Errors section, key by key:
a wrong type, a value out of range, a missing path, a path of the wrong kind, a device that does
not exist here."""
import subprocess
import sys

import pytest
import torch

from qlora.cli import main
from test_reliability import assets, trained  # noqa: F401  (fixtures: a finished 4-step run)

# command -> [(key=value, what the error line must name)]: every key of every command.
BAD_VALUES = {
    "export": [
        ("run_dir={missing}", "run_dir"), ("run_dir={file}", "run_dir"), ("output_dir={file}", "output_dir"),
        ("base=banana", "base='banana'"), ("original={missing}", "original"), ("format=banana", "format='banana'"),
        ("gguf_type=q2", "gguf_type='q2'"), ("dtype=banana", "dtype='banana'"), ("max_shard_size=lots", "max_shard_size"),
        ("overwrite=maybe", "overwrite='maybe'"), ("progress=maybe", "progress='maybe'"),
        ("push_to_hub=not a repo id", "push_to_hub"),
    ],
    "generate": [
        ("model={missing}", "model="), ("model={file}", "model="), ("max_new_tokens=abc", "max_new_tokens='abc'"),
        ("max_new_tokens=0", "max_new_tokens=0"), ("temperature=hot", "temperature='hot'"), ("temperature=-1", "temperature=-1"),
        ("top_p=2", "top_p=2"), ("chat=maybe", "chat='maybe'"), ("device=banana", "device='banana'"), ("seed=abc", "seed='abc'"),
    ],
    "eval": [
        ("run_dir={missing}", "run_dir"), ("base={missing}", "base"), ("data={missing}", "data source"),
        ("format=banana", "format='banana'"), ("metrics=bleu", "bleu"), ("limit=-1", "limit=-1"), ("batch_size=0", "batch_size=0"),
        ("max_new_tokens=abc", "max_new_tokens='abc'"), ("max_seq_len=0", "max_seq_len=0"), ("device=banana", "device='banana'"),
        ("out={missing}/eval.json", "out="), ("progress=maybe", "progress='maybe'"),
    ],
    "quantize": [
        ("model={missing}", "model="), ("output_dir={file}", "output_dir"), ("method=awq", "method='awq'"), ("bits=5", "bits"),
        ("group_size=abc", "group_size='abc'"), ("dataset={missing}", "dataset"), ("desc_act=maybe", "desc_act='maybe'"),
        ("static_groups=maybe", "static_groups='maybe'"), ("sym=maybe", "sym='maybe'"),
        ("true_sequential=maybe", "true_sequential='maybe'"), ("damp_percent=-1", "damp_percent"),
        ("model_seqlen=abc", "model_seqlen='abc'"), ("samples=0", "samples=0"), ("device=banana", "device='banana'"),
        ("overwrite=maybe", "overwrite='maybe'"), ("progress=maybe", "progress='maybe'"),
    ],
    "doctor": [("out={missing}/report.json", "out="), ("out={dir}", "out=")],
}
VALID = {  # what the other keys hold, so that each case has exactly one bad value
    "export": ["run_dir={run}", "output_dir={out}"],
    "generate": ["model={run}", "prompt=w1", "max_new_tokens=2", "device=cpu"],
    "eval": ["run_dir={run}", "device=cpu", "limit=1"],
    "quantize": ["model={model}", "output_dir={out}", "dataset=embedded", "samples=2", "model_seqlen=32", "device=cpu"],
    "doctor": [],
}


def cases():
    for command, bad in BAD_VALUES.items():
        for value, named in bad:
            yield pytest.param(command, value, named, id=f"{command}-{value.split('=')[0]}-{value.split('=', 1)[1][:12]}")


def test_the_table_covers_every_key_of_every_command():
    from qlora.cli import COMMANDS

    for command, (options, _) in COMMANDS.items():
        covered = {value.split("=")[0] for value, _ in BAD_VALUES[command]}
        free_text = {"prompt", "tasks"}  # any text is a prompt; task names are lm-eval's to check
        assert set(options) - free_text <= covered | ({"model"} if command == "eval" else set()), command


@pytest.mark.parametrize("command,value,named", cases())
def test_a_bad_value_is_one_line_a_nonzero_exit_and_nothing_written(command, value, named, trained, tmp_path, capsys):
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not a directory")
    # A path under a file can be neither found nor created (root could create /nonexistent/...).
    fill = dict(missing=a_file / "missing", file=a_file, run=trained, out=tmp_path / "out", model=trained.parent.parent.parent, dir=tmp_path)
    key = value.split("=")[0]
    args = [v.format(**fill) for v in VALID[command] if v.split("=")[0] != key] + [value.format(**fill)]
    if command == "quantize" and key != "model":
        from qlora.embedded import BASE_MODEL_DIR

        args = [a if not a.startswith("model=") else f"model={BASE_MODEL_DIR}" for a in args]
    code = main([command, *args])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().replace("\r", "\n").splitlines() if line.strip()]
    assert code in (1, 2), (code, err[-2000:])
    assert "Traceback" not in err and lines[-1].startswith("error: "), err[-2000:]
    assert named in lines[-1], lines[-1]
    assert not (tmp_path / "out").exists()
