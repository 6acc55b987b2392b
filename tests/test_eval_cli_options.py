"""``dinokit eval`` user errors and options: each a one-line message before any work, the options' spellings and places,
one-process commands under a launcher, Ctrl-C while loading."""

from __future__ import annotations

import shutil

import pytest
import torch

import dinokit.eval.setup as eval_setup
from dinokit.cli import main
from test_eval_cli import args, error_of, sample  # noqa: F401  (sample: a fixture)
from test_knn import one_thread  # noqa: F401  (autouse fixture)


def test_missing_dataset_path(sample, tmp_path, capsys):
    argv = args(sample, tmp_path)
    argv[argv.index("--val-dataset") + 1] = str(tmp_path / "nowhere")
    err = error_of(capsys, ["eval", "knn", *argv])
    assert "nowhere" in err and "does not exist" in err


def args_with_train_copy(sample, tmp_path, change):
    """CLI arguments whose training set is a copy of the sample's, modified by ``change(folder)``."""
    root, _ = sample
    train = tmp_path / "train"
    shutil.copytree(root / "train", train)
    change(train)
    argv = args(sample, tmp_path / "out")
    argv[argv.index("--train-dataset") + 1] = str(train)
    return argv


def test_empty_class_folder(sample, tmp_path, capsys):
    argv = args_with_train_copy(sample, tmp_path, lambda train: (train / "zebra").mkdir())
    err = error_of(capsys, ["eval", "logreg", *argv])
    assert "zebra" in err and "no images" in err


def test_other_user_errors(sample, tmp_path, capsys):
    argv = args_with_train_copy(sample, tmp_path, lambda train: shutil.rmtree(train / "rings"))
    assert error_of(capsys, ["eval", "knn", *argv]) == (
        "error: the val dataset has classes the train dataset lacks (1 of 8, e.g. 'rings'): no neighbour or probe can "
        "predict them; use the same class folders in both")
    config = str(sample[1])
    no_model = [a for a in args(sample, tmp_path / "out") if a not in ("--config-file", config)]
    assert "--model NAME" in error_of(capsys, ["eval", "knn", *no_model])
    too_deep = args(sample, tmp_path / "out", "--n-last-blocks", "8", "--epochs", "1", "--epoch-length", "1")
    assert "exceeds the backbone's 4 blocks" in error_of(capsys, ["eval", "linear", *too_deep])


@pytest.mark.parametrize(
    "protocol, extra, message",
    [
        ("knn", ["--pretrained-weights", "w.pth", "--random-init"],
         "--random-init and --pretrained-weights contradict each other; give one"),
        ("linear", ["--n-last-blocks", "0"], "--n-last-blocks must be at least 1, got 0"),
        ("knn", ["--nb-knn", "5", "0"], "--nb-knn must be at least 1, got 0"),
        ("knn", ["--temperature", "0"], "--temperature must be positive, got 0"),
        ("knn", ["--n-per-class-list", "0"], "--n-per-class-list must hold positive numbers (or -1 = all), got 0"),
        ("logreg", ["--holdout-fraction", "1.5"], "--holdout-fraction is 1.5; it must be between 0 and 1 (exclusive)"),
        ("logreg", ["--c-grid-size", "0"], "--c-grid-size must be at least 1: there is no value of C to try"),
        ("linear", ["--epochs", "0"], "--epochs must be at least 1, got 0"),
        ("knn", ["--chunk-size", "-1"], "--chunk-size must be >= 0 (0 = all at once), got -1"),
        ("logreg", ["--max-iter", "0"], "--max-iter must be at least 1, got 0"),
        ("logreg", ["--backend", "torch", "--tol", "-1"],
         "--tol must be positive (the solver's gradient tolerance), got -1"),
        ("linear", ["--learning-rates", "0.1", "-1"], "--learning-rates must be positive, got -1"),
        # the per-image crop seeds derive from it (a negative one was a traceback)
        ("linear", ["--seed", "-1"], "--seed must be from 0 to 2^32 - 1, got -1"),
        ("linear", ["--seed", str(2**64)], f"--seed must be from 0 to 2^32 - 1, got {2**64}"),  # a traceback, late
        # needs the model's depth (the tiny backbone has 4 blocks): checked once it is built, before the folder
        ("linear", ["--n-last-blocks", "50"], "--n-last-blocks 50 exceeds the backbone's 4 blocks; give at most 4"),
        ("knn", ["--image-size", "4"], "--image-size 4 is smaller than the model's 8-pixel patch; use at least 8"),
        # accepted, and did nothing: k = 10/20/100/200 at T = 0.07 were printed
        ("knn", ["--opts", "evaluation.knn_k=[1]"], "--opts 'evaluation.knn_k=[1]': --opts sets the backbone's keys "
         "of --config-file only (student.*, crops.global_crops_size); the evaluation's settings are its own options "
         "(see --help)"),
    ],
)
def test_option_errors_name_the_option_before_any_work(sample, tmp_path, capsys, protocol, extra, message):
    """F7, F8, F9: each wrong option is named in one line before the output folder or any feature is written."""
    argv = args(sample, tmp_path / "out", *extra)
    if "--pretrained-weights" in extra:  # with weights and no --config-file/--model; the check comes first anyway
        (tmp_path / "w.pth").write_bytes(b"")
        argv[argv.index("--pretrained-weights") + 1] = str(tmp_path / "w.pth")
    assert error_of(capsys, ["eval", protocol, *argv]) == f"error: {message}"
    assert not (tmp_path / "out").exists()


def test_missing_scikit_learn_is_refused_before_any_work(sample, tmp_path, capsys, monkeypatch):
    """F23: --backend sklearn without scikit-learn is one line before the model, the features or the folder."""
    import sys

    from dinokit.errors import DinokitError
    from dinokit.eval import evaluate_logreg

    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` raises ImportError

    def no_model(**kwargs):
        raise AssertionError("the backbone should not be built")

    monkeypatch.setattr(eval_setup, "setup_eval_model", no_model)
    message = "the sklearn backend needs scikit-learn: pip install 'dinokit[eval]', or use --backend torch"
    assert error_of(capsys, ["eval", "logreg", *args(sample, tmp_path / "out", "--backend", "sklearn")]) == \
        f"error: {message}"
    assert not (tmp_path / "out").exists()
    x, y = torch.randn(8, 3), torch.arange(8) % 2
    with pytest.raises(DinokitError) as err:  # the Python function: the same check and line
        evaluate_logreg(x, y, x, y, c_values=[1.0], backend="sklearn")
    assert str(err.value) == message


def test_the_random_init_baseline_says_why(sample, capsys):
    """The line said "no weights given: evaluating ..." also when --weights random was given, and in embed/curate."""
    _, config = sample
    eval_setup.setup_eval_model(config_file=str(config))
    assert capsys.readouterr().out == "no weights given: the randomly initialised backbone (seed 0), a baseline\n"
    _, description = eval_setup.setup_eval_model(config_file=str(config), random_init=True)
    assert capsys.readouterr().out == "random init asked for: the randomly initialised backbone (seed 0), a baseline\n"
    assert description["weights"] == "random-init (seed 0)"


def test_weights_named_random_point_to_the_random_init_flag(tmp_path, monkeypatch):
    """`curate` took --weights random; the other commands take --random-init and said only 'check the path'."""
    from dinokit.errors import DinokitError
    from dinokit.models.weight_files import check_weights_path

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DinokitError) as err:
        check_weights_path("random", "--weights")
    assert str(err.value) == "--weights 'random' does not exist; check the path; for random weights give --random-init instead"


def test_the_weights_option_has_both_spellings_in_every_command():
    """embed/viz/curate/export say --weights, eval/dense (the official evaluation scripts) --pretrained-weights:
    each command accepts both, so a user switching commands is not refused."""
    from dinokit.cli import build_parser

    parser = build_parser()
    commands = {
        "weights": [["embed", "in", "--out", "o.npz"], ["viz", "pca", "in", "--out", "o"], ["curate", "run", "--pool", "p",
                    "--output-dir", "w"], ["export", "onnx", "--image-size", "224", "224", "--out", "o.onnx"]],
        "pretrained_weights": [["eval", "knn", "--train-dataset", "a", "--val-dataset", "b", "--output-dir", "o"],
                               ["dense", "train", "--task", "seg", "--head", "linear", "--train-dataset", "a",
                                "--val-dataset", "b", "--output-dir", "o"]],
    }
    for dest, argvs in commands.items():
        for argv in argvs:
            for option in ("--weights", "--pretrained-weights"):
                assert getattr(parser.parse_args([*argv, option, "w.pth"]), dest) == "w.pth", (argv, option)


def test_settings_may_sit_between_the_options_of_every_command_that_takes_them(capsys):
    """`dinokit train --config-file small optim.epochs=1 --output-dir x train.seed=3` was refused ("unrecognized
    arguments: train.seed=3"): argparse takes only the first run of KEY=VALUE words."""
    from dinokit.cli import build_parser, parse_command_line

    parser = build_parser()
    lines = {
        "opts": [["train", "--config-file", "small"], ["distill", "--config-file", "d.yaml"], ["demo"],
                 ["dense", "train", "--task", "seg", "--head", "linear", "--train-dataset", "a", "--val-dataset", "b"]],
        "overrides": [["curate", "run", "--pool", "p"]],
    }
    for dest, heads in lines.items():
        for head in heads:
            argv = [*head, "a.b=1", "--output-dir", "o", "c=2", "--no-resume" if head[0] != "curate" else "--no-progress",
                    "a.b=3"]
            assert getattr(parse_command_line(parser, argv), dest) == ["a.b=1", "c=2", "a.b=3"], head
    with pytest.raises(SystemExit) as exit_:
        parse_command_line(parser, ["train", "--config-file", "small", "a=1", "--output-dir", "o", "--bogus", "b=2"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.endswith("dinokit train: error: unrecognized arguments: --bogus b=2\n")
    assert err.startswith("usage: dinokit train ")  # the command's usage (it showed 'dinokit [-h] COMMAND ...')
    with pytest.raises(SystemExit):  # a command without settings takes no stray KEY=VALUE either
        parse_command_line(parser, ["embed", "in", "--out", "o.npz", "a=1"])
    assert "unrecognized arguments: a=1" in capsys.readouterr().err
    for argv in (["train", "--config-file", "", "--output-dir", "o"], ["embed", "in", "--out", "o.npz", "--config-file",
                                                                       " "]):
        with pytest.raises(SystemExit):  # a quoted empty variable: it silently meant the defaults (ViT-L for train)
            parse_command_line(parser, argv)
        assert "argument --config-file: is empty; give a preset name or a file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a sub-command's sub-command
        parse_command_line(parser, ["eval", "knn", "--output-dir", "o", "--train-dataset", "a", "--val-dataset", "b",
                                    "--bogus"])
    err = capsys.readouterr().err
    assert err.startswith("usage: dinokit eval knn ") and err.endswith("dinokit eval knn: error: unrecognized "
                                                                         "arguments: --bogus\n")


@pytest.mark.parametrize("launcher", [{"WORLD_SIZE": "2", "RANK": "{rank}"}, {"SLURM_NTASKS": "2", "SLURM_PROCID": "{rank}"}])
def test_one_process_commands_launched_as_several_work_once(launcher, tmp_path, monkeypatch, capsys):
    """`torchrun --nproc_per_node 2 -m dinokit convert|export|viz|data|plot|models ...` did the whole job in every
    process (the same files written twice): the first process works, the others end at once."""
    for name in ("WORLD_SIZE", "RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    for rank in (1, 0):
        for name, value in launcher.items():
            monkeypatch.setenv(name, value.format(rank=rank))
        out = tmp_path / f"sample-{rank}"
        assert main(["data", "sample", "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        if rank:
            assert printed == "" and not out.exists()
        else:
            assert printed.startswith("note: 'data' works in one process; the other 1 launched process(es) did nothing\n")
            assert any((out / "train").iterdir())


def test_ctrl_c_while_the_command_loads_is_one_line(capsys, monkeypatch):
    """A Ctrl-C in the first seconds (torch and the commands loading) printed a traceback: `import dinokit` loaded
    torch before main() could catch it. The package and the CLI module now load torch only when a command needs it."""
    import subprocess
    import sys

    import dinokit.cli

    code = "import sys, dinokit, dinokit.cli; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == "[]\n"

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(dinokit.cli, "build_parser", interrupted)
    assert dinokit.cli.main(["models"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_a_tilde_after_an_equals_sign_is_the_home_folder(monkeypatch, tmp_path):
    """`--output-dir=~/run`: the shell leaves that '~' to the command; train wrote half its files under ~/run and
    half under a literal ./~/run folder, and could not resume."""
    from dinokit.cli import build_parser, parse_command_line

    monkeypatch.setenv("HOME", str(tmp_path))
    args = parse_command_line(build_parser(), ["train", "--config-file", "demo", "--output-dir=~/run", "a.b=~/c"])
    assert args.output_dir == str(tmp_path / "run") and args.opts == ["a.b=~/c"]
    args = parse_command_line(build_parser(), ["viz", "pca", "~/a.png", "~/b.png", "--out=~/o"])
    assert args.inputs == [str(tmp_path / "a.png"), str(tmp_path / "b.png")] and args.out == str(tmp_path / "o")


def test_logreg_says_when_every_value_of_c_ties(sample, tmp_path, capsys):
    """One held-out image scores every C alike (0 or 100%): the smallest C was taken without a word."""
    extra = ("--c-grid-size", "3", "--max-iter", "30")
    assert main(["eval", "logreg", *args(sample, tmp_path, *extra, "--holdout-fraction", "0.01")]) == 0
    out = capsys.readouterr().out
    assert "note: all 3 values of C scored " in out and "% top-1 on held-out train images, so the smallest (1e-06, the " \
        "strongest regularisation) was taken; give --holdout-fraction or more training images for a choice" in out


def test_logreg_refuses_one_training_class_before_extracting(sample, tmp_path, capsys):
    """The one-class line came after every feature was extracted (and after a 'with 1 class' note)."""
    def one_class(train):
        for folder in sorted(train.iterdir())[1:]:
            shutil.rmtree(folder)

    argv = args_with_train_copy(sample, tmp_path, one_class)
    err = error_of(capsys, ["eval", "logreg", *argv])
    assert err.startswith("error: logistic regression needs at least 2 classes among the images it fits on; the ") and \
        err.endswith(" training image(s) have 1; add training images of more classes")
    assert not list((tmp_path / "out").glob("features/*/*.pt"))
