"""The examples run: a few-second version of each (the full runs are recorded in the README)."""
import importlib.util
import os

import torch

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seq2seq_reverse_short_run(tmp_path, capsys):
    example = load("seq2seq_reverse")
    plot = tmp_path / "attention.png"
    result = example.main(["--steps", "40", "--eval-every", "20", "--test-size", "32", "--max-len", "6",
                           "--lr", "1e-2", "--plot", str(plot), "--threads", str(torch.get_num_threads())])
    losses = result["losses"]
    assert len(losses) == 40
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10, "training loss should drop"
    assert 0.0 <= result["accuracy"] <= 1.0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "held-out exact match" in out and "attention heatmap" in out


def test_seq2seq_reverse_held_out_strings_never_trained_on():
    example = load("seq2seq_reverse")
    import random
    rng = random.Random(0)
    held_out = example.sample(rng, 50, 2, 1, 3)  # tiny space: collisions are certain without the exclusion
    train = example.sample(rng, 200, 2, 1, 3, frozenset(held_out[:5]))
    assert not set(train) & set(held_out[:5])
    src, tgt = example.batch([(0, 1, 1), (1,)])
    assert src.tolist() == [[3, 4, 4], [4, 0, 0]]
    assert tgt.tolist() == [[4, 4, 3, 2], [4, 2, 0, 0]]


def test_seq2seq_reverse_refuses_arguments_it_cannot_run(capsys):
    """A held-out set covering most strings made the training sampler loop forever (no output);
    --steps 0, --eval-every 0 and --min-len above --max-len gave tracebacks."""
    import pytest

    example = load("seq2seq_reverse")
    for argv, message in ((["--symbols", "4", "--min-len", "3", "--max-len", "4"], "leaves too few of the 320"),
                          (["--steps", "0"], "--steps must be at least 1"),
                          (["--eval-every", "0"], "--eval-every must be at least 1"),
                          (["--min-len", "5", "--max-len", "3"], "--max-len (3) must be at least --min-len (5)")):
        with pytest.raises(SystemExit):
            example.main(argv)
        assert message in capsys.readouterr().err


def test_generate_cli_names_the_devices_it_has(capsys):
    import pytest

    from attnkit import generate
    with pytest.raises(SystemExit):
        generate.main(["--model", "unused", "--prompt-ids", "1", "--device", "foo"])
    assert "unknown device 'foo'; valid here: cpu" in capsys.readouterr().err
