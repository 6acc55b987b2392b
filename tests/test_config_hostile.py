"""Hostile configuration input: every mistake is one line naming the key (and the fix), never a traceback from
OmegaConf or PyYAML, and never silently accepted (interpolations, malformed lists, null sections, empty files,
keys given twice, the ``???`` mark in an override)."""

from __future__ import annotations

import pytest

from dinokit.cli import main
from dinokit.config.loading import load_config
from dinokit.errors import DinokitError

NOT_SUPPORTED = ": interpolations (${...}) are not supported; write the value itself (on the command line the shell " \
                "expands \"$VAR\")"
NO_SETTINGS_FIX = "; write config sections as YAML (e.g. 'optim:' and below it '  epochs: 10'), or leave the file out"
OPTIM_KEYS = "(epochs, weight_decay, weight_decay_end, ...)"


def _error(config, overrides=()) -> str:
    with pytest.raises(DinokitError) as info:
        load_config(config, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


def _yaml(tmp_path, text: str, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- 1. interpolations: refused (official configs use none), in overrides and files --------------------------------

@pytest.mark.parametrize("override,key,value", [
    ("optim.epochs=${oc.env:HOME}", "optim.epochs", "${oc.env:HOME}"),  # resolves, to the wrong type
    ("optim.epochs=${nope}", "optim.epochs", "${nope}"),  # does not resolve
    ("train.dataset_path=${train.output_dir}", "train.dataset_path", "${train.output_dir}"),  # a string field
    ("optim={epochs: '${nope}'}", "optim.epochs", "${nope}"),
    ("distillation.students=[{arch: '${x}'}]", "distillation.students[0].arch", "${x}"),
])
def test_interpolation_in_an_override_is_one_line(override, key, value) -> None:
    assert _error("demo", [override]) == f"config key '{key}' is '{value}', in override '{override}'{NOT_SUPPORTED}"


def test_interpolation_in_a_file_is_one_line(tmp_path) -> None:
    path = _yaml(tmp_path, "optim:\n  epochs: 3\n  warmup_epochs: ${optim.epochs}\n")
    assert _error(path) == f"config key 'optim.warmup_epochs' is '${{optim.epochs}}', in config file '{path}'" \
                           f"{NOT_SUPPORTED}"


# --- 2. list items of the wrong kind ------------------------------------------------------------------------------

MAPPING = "a mapping of names to values ({name: value, ...})"


@pytest.mark.parametrize("override,message", [
    ("distillation.students=[5]", f"config key 'distillation.students[0]' expects {MAPPING}, got 5"),
    ("distillation.students=[null]", f"config key 'distillation.students[0]' expects {MAPPING}, got null"),
    ("distillation.students=[[1]]", f"config key 'distillation.students[0]' expects {MAPPING}, got [1]"),
    ("distillation.students=[{arch: vit_small}, abc]",
     f"config key 'distillation.students[1]' expects {MAPPING}, got 'abc'"),
    ("distillation.students=[{1: vit_small}]", f"config key 'distillation.students[0]' expects {MAPPING}, got {{1: "
                                               "'vit_small'}"),
    ("distillation.students=null", "config key 'distillation.students' expects a list of mappings ([{name: value, "
                                   "...}, ...]), got None"),
    ("evaluation.knn_k=[[1]]", "config key 'evaluation.knn_k[0]' expects int, got [1]"),
    ("evaluation.knn_k=[10, {a: 1}]", "config key 'evaluation.knn_k[1]' expects int, got {'a': 1}"),
    ("evaluation.knn_k=[null]", "config key 'evaluation.knn_k[0]' expects int, got null"),
    ("crops.global_crops_scale=[[0.3], 1]", "config key 'crops.global_crops_scale[0]' expects float, got [0.3]"),
    ("ibot.mask_ratio_min_max=[0.1, [0.5]]", "config key 'ibot.mask_ratio_min_max[1]' expects float, got [0.5]"),
])
def test_malformed_list_items_are_one_line(override, message) -> None:
    assert _error("distill_demo", [override]) == f"{message}, in override '{override}'"


def test_malformed_students_in_a_file(tmp_path) -> None:
    path = _yaml(tmp_path, "distillation:\n  students:\n  - arch: vit_small\n  - 5\n")
    assert _error(["distill_demo", path]) == (f"config key 'distillation.students[1]' expects {MAPPING}, got 5, in "
                                              f"config file '{path}'")
    good = _yaml(tmp_path, "distillation:\n  students:\n  - {name: a, arch: vit_pico}\n  - arch: vit_small\n",
                 "ok.yaml")
    students = load_config(["distill_demo", good]).distillation.students
    assert [dict(s) for s in students] == [{"name": "a", "arch": "vit_pico"}, {"arch": "vit_small"}]


def test_empty_crop_size_list() -> None:
    override = "crops.global_crops_size=[]"
    assert _error("demo", [override]) == "config key 'crops.global_crops_size' is []; give positive integers (one, " \
                                         "or a list)"


# --- 3. a section set to null ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("override,key,keys", [
    ("optim=null", "optim", OPTIM_KEYS),
    ("optim=~", "optim", OPTIM_KEYS),
    ("compute_precision.teacher=null", "compute_precision.teacher", "(backbone, dino_head, ibot_head, ...)"),
])
def test_null_section_override_is_refused(override, key, keys) -> None:
    assert _error("demo", [override]) == (f"config key '{key}' is null, in override '{override}'; it is a section of "
                                          f"keys {keys}: give some of them or leave it out")


@pytest.mark.parametrize("text", ["optim: null\nteacher:\n  teacher_temp: 0.05\n", "optim: ~\ntrain:\n  seed: 1\n"])
def test_null_section_in_a_file_is_refused(tmp_path, text) -> None:
    path = _yaml(tmp_path, text)
    assert _error(path) == (f"config key 'optim' is null, in config file '{path}'; it is a section of keys "
                            f"{OPTIM_KEYS}: give some of them or leave it out")


def test_blank_section_and_nullable_sections_still_load(tmp_path) -> None:
    """``evaluation:`` with its keys commented out (official style) is an empty section; the sections typed
    ``| None`` take null (no k-NN, no lr schedule)."""
    path = _yaml(tmp_path, "optim:\n  epochs: 20\nevaluation:\n  # eval_period_iterations: 100\n")
    assert load_config(path).optim.epochs == 20
    cfg = load_config("demo", ["evaluation.knn_dataset=null", "optim.lr_schedule=null"])
    assert cfg.evaluation.knn_dataset is None and cfg.optim.lr_schedule is None


# --- 4. a file that holds no settings ------------------------------------------------------------------------------

@pytest.mark.parametrize("text,what", [
    ("", "it is empty or only comments"),
    ("# optim:\n#   epochs: 3\n\n", "it is empty or only comments"),
    ("---\n...\n", "it is empty or only comments"),
    ("{}\n", "its mapping is empty"),
    ("optim:\n  # epochs: 3\nteacher:\n", "its sections (optim, teacher) are all blank"),
    ("5\n", "it holds a single value (5), not config sections"),
    ("vit_small\n", "it holds a single value ('vit_small'), not config sections"),
    ("- optim\n- epochs\n", "it holds a list (['optim', 'epochs']), not config sections"),
])
def test_file_without_settings_is_refused(tmp_path, text, what) -> None:
    path = _yaml(tmp_path, text)
    assert _error(path) == f"config file '{path}' holds no settings: {what}{NO_SETTINGS_FIX}"
    assert _error(["demo", path]) == f"config file '{path}' holds no settings: {what}{NO_SETTINGS_FIX}"


# --- 5. keys given twice --------------------------------------------------------------------------------------------

TWICE = "; keep one (YAML would silently use the last)"


@pytest.mark.parametrize("text,key,lines", [
    ("optim:\n  epochs: 3\noptim:\n  epochs: 4\n", "optim", "lines 1 and 3"),
    ("optim:\n  epochs: 3\n  base_lr: 0.1\n  epochs: 4\n", "optim.epochs", "lines 2 and 4"),
    ("optim:\n  epochs: 3\n  'epochs': 4\n", "optim.epochs", "lines 2 and 3"),
    ("distillation:\n  students:\n  - arch: vit_small\n    arch: vit_base\n", "distillation.students[0].arch",
     "lines 3 and 4"),
])
def test_duplicate_key_in_a_file_is_refused(tmp_path, text, key, lines) -> None:
    path = _yaml(tmp_path, text)
    assert _error(path) == f"config file '{path}' sets '{key}' twice ({lines}){TWICE}"


def test_duplicate_key_in_an_override_is_refused() -> None:
    override = "optim={epochs: 1, epochs: 2}"
    assert _error("demo", [override]) == f"override '{override}' sets 'optim.epochs' twice{TWICE}"


def test_yaml_merge_keys_and_aliases_are_not_duplicates(tmp_path) -> None:
    path = _yaml(tmp_path, "optim:\n  <<: {epochs: 30, warmup_epochs: 5}\n  epochs: 40\n"
                           "crops:\n  global_crops_scale: &scale [0.4, 1.0]\n  local_crops_scale: [0.05, 0.4]\n"
                           "evaluation:\n  knn_k: [1, 2]\n")
    cfg = load_config(path)
    assert (cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.crops.global_crops_scale) == (40, 5, [0.4, 1.0])


# --- siblings ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override,key", [
    ("optim.epochs=???", "optim.epochs"),  # a merge never writes "???": the override silently did nothing
    ("train.dataset_path=???", "train.dataset_path"),
    ("distillation.students=[{arch: '???'}]", "distillation.students"),
])
def test_missing_mark_in_an_override_is_refused(override, key) -> None:
    assert _error("distill_demo", [override]) == (f"override '{override}' gives ???, the mark of a value a config file "
                                                  f"leaves to the command line; give {key} a value")


def test_missing_mark_in_a_preset_still_asks_for_the_value() -> None:
    assert _error("vitl14_highres").startswith("preset 'train/vitl14_highres' needs a value for "
                                               "student.resume_from_teacher_chkpt (marked ???)")


def test_odd_override_key_is_one_line() -> None:
    """A key part that is not ``name`` or ``name[index]`` used to be an AttributeError."""
    assert _error("demo", ["optim.a[b]=1"]).startswith("unknown config key 'optim.a[b]' (keys of 'optim': epochs, ")


def test_curation_settings_share_the_checks() -> None:
    from dinokit.curate.config import make_config

    with pytest.raises(DinokitError) as info:
        make_config({"pool": "/x", "dedup": None}, source="settings.json")
    assert str(info.value).startswith("curate key 'dedup' is null, in settings.json; it is a section of keys (")
    with pytest.raises(DinokitError) as info:
        make_config({"pool": "/x"}, ["eval_sets=['${oc.env:HOME}']"])
    assert str(info.value) == ("curate key 'eval_sets[0]' is '${oc.env:HOME}', in override "
                               f"'eval_sets=['${{oc.env:HOME}}']'{NOT_SUPPORTED}")


# --- the command line: "error: <line>", status 2, nothing written -------------------------------------------------

@pytest.mark.parametrize("command,config_text,overrides,message", [
    ("train", None, ["optim.epochs=${oc.env:HOME}"],
     f"config key 'optim.epochs' is '${{oc.env:HOME}}', in override 'optim.epochs=${{oc.env:HOME}}'{NOT_SUPPORTED}"),
    ("train", None, ["optim=null"], f"config key 'optim' is null, in override 'optim=null'; it is a section of keys "
                                    f"{OPTIM_KEYS}: give some of them or leave it out"),
    ("train", "", [], f"config file '{{path}}' holds no settings: it is empty or only comments{NO_SETTINGS_FIX}"),
    ("train", "optim:\n  epochs: 3\n  epochs: 4\n", [], f"config file '{{path}}' sets 'optim.epochs' twice (lines 2 "
                                                         f"and 3){TWICE}"),
    ("distill", None, ["distillation.students=[5]"],
     f"config key 'distillation.students[0]' expects {MAPPING}, got 5, in override 'distillation.students=[5]'"),
])
def test_command_line_refuses_in_one_line_before_writing(tmp_path, capsys, command, config_text, overrides,
                                                         message) -> None:
    out = tmp_path / "run"
    out.mkdir()
    args = [command, "--output-dir", str(out), "--device", "cpu"]
    path = None
    if config_text is not None:
        path = _yaml(tmp_path, config_text)
        args += ["--config-file", path]
    capsys.readouterr()
    assert main([*args, *overrides]) == 2
    assert capsys.readouterr().err == f"error: {message.replace('{path}', str(path))}\n"
    assert list(out.iterdir()) == []


def test_a_deeply_nested_file_is_one_line(tmp_path):
    from dinokit.config import load_config

    deep = tmp_path / "deep.yaml"
    deep.write_text("optim:\n  epochs: 2\nx: " + "[" * 3000 + "]" * 3000 + "\n")  # RecursionError traceback before
    with pytest.raises(DinokitError, match=f"^config file '{deep}' is nested too deeply to read"):
        load_config(str(deep))


# --- keys that something else keeps from acting: one line naming both, never silently accepted ---------------------

GRAM_OFF = "does nothing without gram.use_loss=true (or gram.compute_stats=true); set that too, or remove the key"


@pytest.mark.parametrize("overrides,message", [
    (["gram.ckpt=/x.pth"], f"config key 'gram.ckpt' {GRAM_OFF}"),
    (["gram.loss_weight=2"], f"config key 'gram.loss_weight' {GRAM_OFF}"),
    (["crops.gram_teacher_no_distortions=true"], f"config key 'crops.gram_teacher_no_distortions' {GRAM_OFF}"),
    (["gram.compute_stats=true", "gram.it_load_ema_teacher=0", "gram.loss_weight=3"],
     "config key 'gram.loss_weight' does nothing without gram.use_loss=true (gram.compute_stats only logs the Gram "
     "loss); set that too, or remove the key"),
    (["gram.use_loss=true", "gram.ema_teacher=true", "gram.max_updates=3"],
     "config key 'gram.max_updates' does nothing with gram.ema_teacher=true (the EMA teacher itself is the Gram "
     "teacher: nothing is refreshed), or remove the key"),
    # more chunks than blocks: a ZeroDivisionError at the first snapshot, the run's work lost
    (["student.block_chunks=8"], "config key 'student.block_chunks' is 8 but vit_pico has 4 blocks; set at most 4"),
])
def test_a_key_that_could_not_act_is_one_line(overrides, message, tmp_path) -> None:
    from dinokit.config import check_idle_keys

    if "block_chunks" in message:  # the architecture: checked whenever the config is read
        assert _error("demo", overrides).startswith(message)
        return
    cfg = load_config("demo", overrides)  # read (a run's architecture, a resume): accepted
    with pytest.raises(DinokitError) as info:
        check_idle_keys(cfg, tmp_path / "new", resume=True)  # a new run: refused
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    # a run an earlier version started with such a key (its config.yaml saved) resumes; --no-resume is a new run
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.yaml").write_text("optim: {epochs: 1}\n")
    check_idle_keys(cfg, tmp_path / "old", resume=True)
    with pytest.raises(DinokitError):
        check_idle_keys(cfg, tmp_path / "old", resume=False)


def test_keys_that_act_or_that_presets_spell_out_pass() -> None:
    """The rules compare with the defaults: the presets' own values and the keys' working combinations load."""
    for preset in ("demo", "small", "distill_demo", "continued", "vitl14", "vitg14", None):
        load_config(preset, ["dino.head_n_prototypes=1024"])  # presets also spell out iBOT's (unread) head sizes
    load_config("demo", ["gram.use_loss=true", "gram.it_load_ema_teacher=0", "gram.loss_weight=2", "gram.max_updates=3",
                         "student.block_chunks=4"])
    load_config("demo", ["gram.use_loss=true", "gram.ema_teacher=true", "gram.rep_update=false"])
    schedule = load_config("demo", ["optim.lr_schedule={start: 0, peak: 0.5, end: 0, warmup_epochs: 1}"])
    assert schedule.optim.base_lr == 0.02  # replaced by the schedule, whose peak config.yaml records as optim.lr:


def test_config_yaml_records_the_peak_of_an_lr_schedule() -> None:
    from dinokit.config import apply_scaling_rules

    cfg = load_config("demo", ["optim.lr_schedule={start: 0, peak: 0.5, end: 0, warmup_epochs: 1}",
                               "train.batch_size_per_gpu=256"])
    assert apply_scaling_rules(cfg, world_size=1).optim.lr == 0.5 * 0.5  # sqrt(256 / 1024); base_lr said 0.01
    ramp = load_config("demo", ["optim.lr_schedule={start: 0, peak: 0, end: 5.0e-5, warmup_epochs: 0}",
                                "train.batch_size_per_gpu=256"])  # the README's: a rise to end (peak 0 said lr 0)
    assert apply_scaling_rules(ramp, world_size=1).optim.lr == pytest.approx(5.0e-5 * 0.5)


def test_a_distilled_student_with_more_chunks_than_blocks_is_one_line() -> None:
    from dinokit.distill.run import student_sections

    cfg = load_config("distill_demo", ["distillation.students=[{arch: vit_pico}, {arch: vit_pico, block_chunks: 5}]"])
    with pytest.raises(DinokitError, match=r"^config key 'distillation.students\[1\].block_chunks' is 5 but vit_pico "
                                           r"has 4 blocks; set at most 4"):
        student_sections(cfg)
