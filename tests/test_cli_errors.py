"""User errors at the command line (issue items 9 and 10): one line ``tq-deploy CMD: error: ...`` and
exit status 2, never a traceback (``--debug`` shows it); output paths checked before the work;
nothing the user had is lost when a write fails."""

from __future__ import annotations

import os
import re
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tq_deploy import files
from tq_deploy.cli import main

REPO = Path(__file__).resolve().parents[1]
ERROR_LINE = re.compile(r"^tq-deploy( [\w-]+)*: error: \S.*$")


def error_line(rc, err: str, fragments) -> str:
    """Exit status 2 and exactly one ``tq-deploy ...: error:`` line on stderr holding every fragment."""
    lines = err.strip().splitlines()
    assert rc == 2, f"exit status {rc}, expected 2; stderr: {err}"
    assert len(lines) == 1 and ERROR_LINE.match(lines[0]), f"expected one error line, got: {err!r}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def one_error(capsys, argv, *fragments) -> str:
    rc = main(list(argv))
    return error_line(rc, capsys.readouterr().err, fragments)


def argparse_error(capsys, argv, *fragments) -> str:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    return error_line(info.value.code, capsys.readouterr().err, fragments)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A good single-op model and broken variants of it, written once."""
    from tq_deploy.export.single_op import make_op_model

    folder = tmp_path_factory.mktemp("models")
    good = make_op_model("TQPagedAttention", head_dim=64, bits=2, num_q_heads=4, num_kv_heads=2)
    paths = {"good": folder / "good.onnx"}
    onnx.save(good, paths["good"])
    data = paths["good"].read_bytes()
    (folder / "truncated.onnx").write_bytes(data[: len(data) // 3])
    (folder / "random.onnx").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (folder / "folder.onnx").mkdir()

    def variant(name, edit):
        model = onnx.ModelProto()
        model.CopyFrom(good)
        edit(model)
        onnx.save(model, folder / f"{name}.onnx")

    def drop_input(m):
        keep = [i for i in m.graph.input if i.name != "context_lens"]
        del m.graph.input[:]
        m.graph.input.extend(keep)

    def set_attr(name, value):
        def edit(m):
            node = m.graph.node[0]
            kept = [a for a in node.attribute if a.name != name]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute(name, value)])
        return edit

    def opset(m):
        next(o for o in m.opset_import if o.domain == "turboquant").version = 99

    variant("missing_input", drop_input)
    variant("bad_bits", set_attr("k_bits", 12))
    variant("int_scale", set_attr("scale", 2))
    variant("unknown_attr", set_attr("alpha", 1.0))
    variant("opset99", opset)
    return folder


RUN_ERRORS = [
    (["truncated.onnx"], ["'", "truncated.onnx", "is not a readable ONNX file"]),
    (["random.onnx"], ["random.onnx", "is not a readable ONNX file"]),
    (["folder.onnx"], ["folder.onnx", "is a folder, expected an .onnx file"]),
    (["nowhere.onnx"], ["nowhere.onnx", "does not exist"]),
    (["missing_input.onnx"], ["missing_input.onnx", "reads 'context_lens'", "no graph input"]),
    (["bad_bits.onnx"], ["k_bits=12", "expected one of"]),
    (["int_scale.onnx"], ["attribute scale has type INT, expected FLOAT"]),
    (["unknown_attr.onnx"], ["attribute 'alpha' is unknown"]),
    (["opset99.onnx"], ["opset 'turboquant' version 99, expected version 1"]),
    (["good.onnx", "--library", "/nonexistent/libtq.so"], ["library='/nonexistent/libtq.so' does not exist"]),
    (["good.onnx", "--library", "/etc/hostname"], ["library='/etc/hostname' does not load as the TurboQuant "
                                                   "custom-op library"]),
    (["good.onnx", "--context-lens", "100000000"], ["--context-lens 100000000 needs about", "GiB available"]),
    (["good.onnx", "--save-outputs", "/nowhere/out.npz"], ["--save-outputs", "folder '/nowhere' does not exist"]),
    (["good.onnx", "--save-outputs", "/proc/out.npz"], ["--save-outputs", "folder '/proc' does not take new files"]),
]


@pytest.mark.parametrize("argv,fragments", RUN_ERRORS, ids=[a[0] + "".join(a[1:2]) for a, _ in RUN_ERRORS])
def test_run_errors_are_one_line(models, capsys, monkeypatch, argv, fragments):
    monkeypatch.chdir(models)
    one_error(capsys, ["run", *argv], *fragments)


@pytest.mark.parametrize("edit,fragments", [
    (lambda f: f.update(context_lens=f["context_lens"].astype(np.int64)),
     ["input 'context_lens' has dtype int64, expected int32"]),
    (lambda f: f.update(query=f["query"].astype(np.float64)), ["input 'query' has dtype float64, expected float32"]),
    (lambda f: f.update(query=f["query"][:, :3]), ["input 'query' has shape [", ", 3, 64], expected [batch, 4, 64]"]),
    (lambda f: f.pop("block_tables"), ["missing ['block_tables']"]),
], ids=["ctx-int64", "query-float64", "query-heads", "missing"])
def test_run_given_inputs_of_the_wrong_kind(models, capsys, tmp_path, edit, fragments):
    from tq_deploy.export.common import load_model
    from tq_deploy.validate.inputs import random_inputs

    feeds = {k: v.numpy() for k, v in random_inputs(load_model(models / "good.onnx"), seed=0).items()}
    edit(feeds)
    np.savez(tmp_path / "inputs.npz", **feeds)
    one_error(capsys, ["run", str(models / "good.onnx"), "--inputs", str(tmp_path / "inputs.npz")], *fragments)


@pytest.mark.parametrize("argv,fragments", [
    (["bench", "quantizer", "--num-vectors", "0"], ["--num-vectors", "0, expected an int >= 1"]),
    (["bench", "quantizer", "--num-vectors", "-5"], ["--num-vectors", "-5, expected an int >= 1"]),
    (["bench", "quantizer", "--repeat", "0"], ["--repeat", "expected an int >= 1"]),
    (["bench", "quantizer", "--device", "bogus"], ["--device", "'bogus', expected cpu, cuda or cuda:N"]),
    (["bench", "ort", "--runs", "0"], ["--runs", "expected an int >= 1"]),
    (["bench", "ort", "--threads", "-1"], ["--threads", "expected an int >= 0"]),
    (["bounds", "--num-vectors", "0"], ["--num-vectors", "expected an int >= 1"]),
    (["run", "x.onnx", "--repeat", "0"], ["--repeat", "expected an int >= 1"]),
    (["pipeline", "--repeat", "-2"], ["--repeat", "expected an int >= 1"]),
    (["eval-ppl", "--threads", "0"], ["--threads", "expected an int >= 1"]),
    (["eval-ppl", "--threads", "-1"], ["--threads", "expected an int >= 1"]),
    (["eval-ppl", "--device", "tpu:0"], ["--device", "expected cpu, cuda or cuda:N"]),
    (["fuzz", "--cases", "0"], ["--cases", "expected an int >= 1"]),
    (["soak", "--steps", "0"], ["--steps", "expected an int >= 1"]),
    (["export", "--out", "x.onnx", "--bits", "9"], ["--bits", "invalid choice: 9"]),
    (["bounds", "--num-vectors", "many"], ["--num-vectors", "'many' is not an int"]),
], ids=lambda v: "-".join(v) if isinstance(v, list) and v and v[0] in
    ("bench", "bounds", "run", "pipeline", "eval-ppl", "fuzz", "soak", "export") else None)
def test_bad_counts_and_choices_are_one_line(capsys, argv, fragments):
    argparse_error(capsys, argv, *fragments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a CUDA device has cuda:0")
def test_cuda_device_on_a_machine_without_one(capsys):
    argparse_error(capsys, ["bench", "quantizer", "--device", "cuda:7"], "--device", "no CUDA device")


def test_export_output_checks(capsys, tmp_path):
    one_error(capsys, ["export", "--out", "/nowhere/dir/x.onnx"], "--out", "folder '/nowhere/dir' does not exist")
    one_error(capsys, ["export", "--out", str(tmp_path)], "is a folder, expected a file path")
    one_error(capsys, ["export", "--out", "/proc/x.onnx"], "folder '/proc' does not take new files")


def test_dtype_is_never_dropped(models, capsys, tmp_path):
    """--dtype float16 where it cannot apply is refused, not ignored (the model would be float32)."""
    one_error(capsys, ["export", "--dtype", "float16", "--out", str(tmp_path / "x.onnx")],
              "--dtype='float16' with the synthetic decode model, expected 'float32'")
    assert not (tmp_path / "x.onnx").exists()
    one_error(capsys, ["engine", "--dtype", "float16", "--out", str(tmp_path / "e")],
              "--dtype='float16' with the synthetic decode model")
    assert not (tmp_path / "e").exists()
    one_error(capsys, ["engine", "--onnx", str(models / "good.onnx"), "--dtype", "float16", "--out",
                       str(tmp_path / "e2")], "--dtype='float16' with --onnx, expected 'float32'")
    assert not (tmp_path / "e2").exists()
    assert main(["export", "--op", "TQEncode", "--dtype", "float16", "--out", str(tmp_path / "op.onnx")]) == 0
    assert onnx.load(tmp_path / "op.onnx").graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_validate_with_a_missing_engine(models, capsys):
    one_error(capsys, ["validate", str(models / "good.onnx"), "--engine", "/nowhere/model.engine"],
              "--engine '/nowhere/model.engine' does not exist")


def test_engine_dim_names_must_exist(models, capsys, tmp_path):
    one_error(capsys, ["engine", "--onnx", str(models / "good.onnx"), "--out", str(tmp_path / "e"),
                       "--dim", "batchh=1,2,4"], "dim 'batchh' names no dynamic dim",
              "['batch', 'max_blocks', 'num_blocks']")
    one_error(capsys, ["engine", "--onnx", str(models / "opset99.onnx"), "--out", str(tmp_path / "e")],
              "version 99")


def test_eval_ppl_checks_its_outputs_before_the_evaluation(capsys, tmp_path):
    """Today's failure mode: the whole evaluation, then 'No such file'. The paths are checked before
    the model is loaded: nothing is printed before the error line."""
    for argv, fragment in ((["--json", "/missing/dir/x.json"], "path '/missing/dir/x.json': folder '/missing/dir' "
                                                                "does not exist"),
                           (["--plot", str(tmp_path)], "is a folder, expected a file path"),
                           (["--text", str(tmp_path / "none.txt")], "--text"),
                           (["--model-dir", str(tmp_path / "none")], "--model-dir")):
        one_error(capsys, ["eval-ppl", "--tokens", "16", "--configs", "mse-4", *argv], fragment)
        assert capsys.readouterr().out == ""


def test_debug_shows_the_traceback(models):
    with pytest.raises(ValueError, match="does not exist"):
        main(["--debug", "run", str(models / "nowhere.onnx")])


def test_an_unknown_option_is_one_line_too(capsys):
    argparse_error(capsys, ["run", "x.onnx", "--repaet", "3"], "unrecognized arguments: --repaet 3")


# ------------------------------------------------------------------ nothing lost on disk


def _limited(max_bytes: int):
    """preexec_fn: writes past max_bytes fail with EFBIG (SIGXFSZ ignored), as on a full disk."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


def test_a_failed_export_keeps_the_previous_model(tmp_path, capsys):
    """A write that fails half-way (file size limit: what a full disk does) leaves the old model
    byte for byte, and no temporary file behind."""
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous model")
    os.chmod(out, 0o640)
    done = subprocess.run([sys.executable, "-m", "tq_deploy.cli", "export", "--out", str(out), "--op", "TQEncode",
                           "--bits", "4", "--head-dim", "128"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, preexec_fn=_limited(20_000))
    # the installed entry point's behaviour, in a fresh interpreter: one line, status 2, no traceback
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and ERROR_LINE.match(lines[0]) and "File too large" in lines[0], done.stderr
    assert out.read_bytes() == b"the previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    # and without the limit the same command replaces it, keeping the file's permissions
    assert main(["export", "--out", str(out), "--op", "TQEncode", "--bits", "4", "--head-dim", "128"]) == 0
    assert onnx.load(out).graph.node[0].op_type == "TQEncode"
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_new_files_get_the_usual_permissions(tmp_path):
    """mkstemp makes 0600 files; a model or report written through it must be as readable as one
    written with open() (0666 less the umask)."""
    umask = os.umask(0o022)
    try:
        files.write_text(tmp_path / "report.json", "{}")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o644


def test_atomic_path_keeps_the_extension_for_format_sniffing_writers(tmp_path):
    """numpy.savez appends .npz to a name without it, matplotlib picks the format from it: the
    temporary file must end like the destination."""
    target = tmp_path / "outputs.npz"
    with files.atomic_path(target) as tmp:
        assert tmp.endswith(".npz")
        np.savez(tmp, a=np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs.npz"]
    with np.load(target) as data:
        assert data["a"].tolist() == [0, 1, 2]


def test_a_failing_writer_leaves_the_destination(tmp_path):
    target = tmp_path / "plot.png"
    target.write_bytes(b"old plot")
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            Path(tmp).write_bytes(b"half a pl")
            raise RuntimeError("the writer failed")
    assert target.read_bytes() == b"old plot"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]
