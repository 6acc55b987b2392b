"""The frozen teacher of a distillation: where it comes from, and the modules it is loaded into.

A teacher is (1) a ``dinokit train`` output folder (its newest ``eval/training_*/teacher_checkpoint.pth``
and its ``config.yaml``), (2) a ``teacher_checkpoint.pth`` with its run's ``config.yaml`` beside it (or
named by ``distillation.teacher_config``), or (3) a bare backbone file (official ``*_pretrain.pth``,
``.safetensors``...), usable with ``distillation.loss=features`` only: the released backbones come
without the DINO/iBOT heads that the paper's recipe needs. Loading is strict.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from .. import distributed as du
from ..config import backbone_from_config, backbone_img_size, find_run_config, load_config
from ..config.schema import StudentConfig
from ..errors import DinokitError
from ..files import LOCK_NAME, lock_holder
from ..models.architectures import ARCHITECTURES
from ..models.checkpoint import backbone_state_dict_of_any_layout, describe_backbone_state_dict, load_backbone_weights
from ..models.weight_files import load_state_dict_file, newest_snapshot, no_snapshot_fix
from ..train.objective import ssl_heads


@dataclass
class TeacherSource:
    weights: Path  # the file the teacher is loaded from
    config: DictConfig | None  # its run's configuration (architecture and heads); None for a bare backbone file


def resolve_teacher(spec: str, teacher_config: str = "", *, started_with: str | None = None) -> TeacherSource:
    """Find the teacher's weights and configuration from ``distillation.teacher`` (and ``teacher_config``). For a
    run folder, its newest snapshot; ``started_with``: the snapshot a resumed distillation started from, kept when
    it lies in that folder (the folder's newest may be a later one: the students would change teacher halfway)."""
    if not spec:
        raise DinokitError("no teacher given: pass --teacher RUN_DIR|teacher_checkpoint.pth|backbone file")
    path = Path(spec).expanduser()
    if not path.exists():
        raise DinokitError(f"teacher {spec!r} does not exist; pass a dinokit train output folder, a "
                           "teacher_checkpoint.pth or a backbone file")
    if path.is_dir():
        snapshot = newest_snapshot(path)
        if snapshot is None:
            raise DinokitError(f"teacher folder {spec!r} has no eval/training_*/teacher_checkpoint.pth; "
                               f"{no_snapshot_fix(path)}")
        kept = Path(started_with) if started_with else None
        if kept is not None and kept.is_file() and path.resolve() in kept.resolve().parents:
            if kept.resolve() != snapshot.resolve() and du.is_main_process():
                print(f"note: resuming with the teacher snapshot this distillation started from, {kept} (the newest "
                      f"in {spec} is now {snapshot})")
            snapshot = kept
        else:
            try:
                holder = lock_holder(path / LOCK_NAME)
            except DinokitError:  # a lock that cannot be read: nothing to say (the note is only information)
                holder = None
            # the teacher still trains: a later start of this command would take a newer snapshot
            if holder is not None and holder[2] and du.is_main_process():
                print(f"note: the teacher run {spec} is still training (process {holder[1]} on {holder[0]}): its "
                      f"newest snapshot so far, {snapshot}, is the teacher")
        path = snapshot
    if teacher_config:
        config_path = Path(teacher_config).expanduser()
        if not config_path.is_file():
            raise DinokitError(f"distillation.teacher_config {teacher_config!r} is not a file; give the teacher "
                               "run's config.yaml")
    else:
        config_path = find_run_config(path)
    return TeacherSource(weights=path, config=load_config(str(config_path)) if config_path else None)


def backbone_section(info: dict) -> DictConfig:
    """A ``student`` section describing a backbone file from its shapes (official settings for the rest)."""
    arch = next((name for name, dims in ARCHITECTURES.items()
                 if (dims["embed_dim"], dims["depth"]) == (info.get("embed_dim"), info.get("depth"))), None)
    if arch is None:
        raise DinokitError(f"the teacher file holds a ViT with embed_dim {info.get('embed_dim')} and "
                           f"{info.get('depth')} blocks, which no dinokit architecture has; give its run's "
                           "config.yaml with distillation.teacher_config")
    registers = info["num_register_tokens"]
    section = OmegaConf.structured(StudentConfig(
        arch=arch, patch_size=info["patch_size"], ffn_layer=info.get("ffn_layer", "mlp"),
        layerscale=1.0 if info["layerscale"] else 0.0, num_register_tokens=registers,
        # the released register models resize the position embedding by size with antialiasing
        interpolate_antialias=registers > 0, interpolate_offset=0.0 if registers else 0.1,
    ))
    return section


def build_teacher(source: TeacherSource, *, with_heads: bool) -> tuple[nn.ModuleDict, DictConfig | None]:
    """The teacher as a ``ModuleDict`` (``backbone``, and with ``with_heads`` its ``dino_head``/``ibot_head``),
    loaded strictly, and its run's configuration (None for a bare backbone file)."""
    state = load_state_dict_file(source.weights)
    where = str(source.weights)
    if source.config is None:
        if with_heads:
            raise DinokitError(
                f"no config.yaml found beside the teacher {where!r}, so its heads cannot be built: set "
                "distillation.teacher_config=RUN/config.yaml, or distil its tokens with distillation.loss=features"
            )
        sd = backbone_state_dict_of_any_layout(state, source=repr(where))
        info = describe_backbone_state_dict(sd)
        backbone = backbone_from_config(backbone_section(info), img_size=info.get("img_size", 224))
        load_backbone_weights(backbone, sd)
        return nn.ModuleDict({"backbone": backbone}), None

    tcfg = source.config
    backbone = backbone_from_config(tcfg.student, img_size=backbone_img_size(tcfg.crops))
    load_backbone_weights(backbone, backbone_state_dict_of_any_layout(state, source=repr(where)))
    modules: dict[str, nn.Module] = {"backbone": backbone}
    if with_heads:
        inner = state.get("teacher", state)
        if "model" in state and "optimizer" in state:  # a training checkpoint: the EMA teacher's modules
            inner = {k[len("teacher."):]: v for k, v in state["model"].items() if k.startswith("teacher.")}
        for name, head in ssl_heads(tcfg.dino, tcfg.ibot, backbone.embed_dim).items():
            head_sd = {k[len(name) + 1 :]: v for k, v in inner.items() if k.startswith(name + ".")}
            if not head_sd:
                raise DinokitError(f"the teacher file {where!r} has no {name} (only backbones were saved); distil "
                                   "its tokens with distillation.loss=features")
            try:
                head.load_state_dict(head_sd, strict=True)
            except RuntimeError as err:
                first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
                raise DinokitError(f"the teacher's {name} in {where!r} does not match its config.yaml ({first}); "
                                   "check distillation.teacher_config") from None
            modules[name] = head
    return nn.ModuleDict(modules), tcfg
