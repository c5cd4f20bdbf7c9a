"""Run configuration: the paper's numbers, the global-batch rule, and errors that name the field before Ray starts."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from cluster.config import ConfigError, TrainConfig, accumulation, check, load_config, resolve
from tests.conftest import ROOT

PAPER, CPU = ROOT / "launch/configs/paper.yaml", ROOT / "launch/configs/cpu.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from tests.test_train import make_shards

    return make_shards(tmp_path_factory.mktemp("cfg-shards"))


def test_paper_yaml_holds_the_papers_hyperparameters():
    """paper.yaml: stage 1 Adam 1e-4, batch 128, ×1/3 every 20 epochs, flips+crops; stage 2 Adam 10/3e-3, batch 8,
    ×1/3 at the end of epochs 10/25/50/80, α = 0.001; on GPUs, plain data parallel, BatchNorm over the paper's 8 images
    (SyncBatchNorm: one image per GPU), precision chosen from the hardware."""
    cfg = load_config(PAPER)
    s1, s2 = cfg.stage1, cfg.stage2
    assert (s1.lr, s1.batch_size, s1.lr_every, s1.augment) == (1e-4, 128, 20, True)
    assert s1.lr_gamma == pytest.approx(1 / 3) and s2.lr_gamma == pytest.approx(1 / 3)
    assert (s2.batch_size, s2.lr_milestones, s2.alpha) == (8, [10, 25, 50, 80], 0.001)
    assert s2.lr == pytest.approx(10 / 3 * 1e-3)
    assert cfg.preset == "paper" and cfg.cluster.use_gpu and cfg.engine.zero_stage == 0
    assert cfg.engine.batchnorm == "sync" and cfg.engine.precision == "auto"


@pytest.mark.parametrize("epoch,factor", [(0, 1), (9, 1), (10, 1 / 3), (24, 1 / 3), (25, 1 / 9), (50, 1 / 27), (80, 1 / 81), (99, 1 / 81)])
def test_stage2_lr_drops_at_the_end_of_epochs_10_25_50_80(epoch, factor):
    """0-based epoch 10 is the first after the end of (1-based) epoch 10."""
    s2 = load_config(PAPER).stage2
    assert s2.lr_at(epoch) == pytest.approx(s2.lr * factor)


@pytest.mark.parametrize("epoch,factor", [(0, 1), (19, 1), (20, 1 / 3), (39, 1 / 3), (40, 1 / 9)])
def test_stage1_lr_drops_every_20_epochs(epoch, factor):
    s1 = load_config(PAPER).stage1
    assert s1.lr_at(epoch) == pytest.approx(1e-4 * factor)


@pytest.mark.parametrize(
    "batch,world,max_micro,expect",
    [(128, 1, 128, (128, 1)), (128, 2, 128, (64, 1)), (128, 2, 32, (32, 2)), (8, 8, 8, (1, 1)), (8, 2, 2, (2, 2)),
     (8, 1, 3, (2, 4))],
)
def test_global_batch_is_workers_times_accumulation_times_micro(batch, world, max_micro, expect):
    """The smallest accumulation count with a micro-batch that fits keeps the global batch exact."""
    micro, accum = accumulation(batch, world, max_micro)
    assert (micro, accum) == expect and micro * accum * world == batch


@pytest.mark.parametrize("batch,world,max_micro", [(8, 3, 8), (8, 16, 8), (128, 5, 128)])
def test_global_batch_that_cannot_be_kept_is_refused(batch, world, max_micro):
    with pytest.raises(ConfigError, match="batch"):
        accumulation(batch, world, max_micro)


@pytest.mark.parametrize(
    "override,field",
    [
        ("stage2.lrr=0.1", "stage2.lrr"),  # unknown key
        ("nope=1", "nope"),
        ("stage2.epochs=1.5", "stage2.epochs"),  # wrong type
        ("cluster.use_gpu=yes please", "cluster.use_gpu"),
        ("stage2.lr_milestones=ten", "stage2.lr_milestones"),
        ("run=3", "run"),
    ],
)
def test_bad_keys_and_types_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(CPU, [override])
    assert e.value.field == field and str(e.value).startswith(f"{field}:")


def test_broken_yaml_is_a_config_error(tmp_path):
    """A file or an override that does not parse as YAML is a ConfigError, not a traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage2: [epochs: 3\n")
    with pytest.raises(ConfigError, match=r"^--config: .*not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"^stage2.lr_milestones: .*not valid YAML"):
        load_config(CPU, ["stage2.lr_milestones=[1, 2"])


def test_overrides_are_typed():
    cfg = load_config(CPU, ["stage2.lr=1e-3", "run.stages=[2]", "cluster.num_workers=4", "run.telemetry_port=9400"])
    assert cfg.stage2.lr == 1e-3 and cfg.run.stages == [2] and cfg.cluster.num_workers == 4
    assert cfg.run.telemetry_port == 9400 and isinstance(cfg.stage2.lr, float)


def test_off_is_a_word_where_a_field_takes_words_and_false_where_it_takes_a_boolean(tmp_path):
    """YAML 1.1 reads off/on/yes/no as booleans: ``engine.step_compile=off`` (its documented value) became False and
    was refused as 'False'. Only true/false are booleans now; a bool field still takes the words."""
    cfg = load_config(CPU, ["engine.step_compile=off", "stage1.augment=off", "run.stages=[1]"])
    assert cfg.engine.step_compile == "off" and cfg.stage1.augment is False
    assert load_config(CPU, ["stage1.augment=yes", "run.stages=[1]"]).stage1.augment is True
    f = tmp_path / "c.yaml"
    f.write_text("defaults: [cpu]\nengine:\n  step_compile: off\nstage1:\n  augment: on\n")
    cfg = load_config(f)
    assert cfg.engine.step_compile == "off" and cfg.stage1.augment is True


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["engine.zero_stage=3"], "engine.zero_stage"),
        (["engine.batchnorm=sync"], "engine.batchnorm"),  # SyncBatchNorm needs GPUs
        (["cluster.num_workers=3"], "stage1.batch_size"),  # 16 over 3 workers
        (["run.stages=[2, 1]"], "run.stages"),
        (["preset=huge"], "preset"),
        (["stage2.priors=/some/priors.safetensors"], "stage2.priors"),  # stage 1 would overwrite them
        (["cluster.min_workers=3"], "cluster.min_workers"),  # more than num_workers=2
        (["cluster.min_workers=1", "engine.zero_stage=1"], "engine.zero_stage"),  # ZeRO-1 ties checkpoints to a world size
        (["engine.precision=fp16"], "engine.precision"),
        (["engine.bucket_mb=0"], "engine.bucket_mb"),
        (["stage1.crop_pad=24"], "stage1.crop_pad"),
        (["run.stages=[1,2,3]", "stage3.srnet=/some/srnet.safetensors"], "stage3.srnet"),  # stage 2 writes it
        (["run.stages=[2,3]", "stage2.model=srcnn", "stage2.loss=mse"], "run.stages"),  # no correction to gate
        (["run.stages=[2,3]", "stage2.alpha=0", "stage3.degradation=nope"], "stage3.degradation"),
        (["run.stages=[3]", "stage3.batch_size=8"], "run.stages"),  # no srnet.safetensors in the run folder yet
        (["run.stages=[3]", "stage3.batch_size=8", "stage3.srnet=/no/such/srnet.safetensors"], "stage3.srnet"),
        # elastic 2..4 workers: 16 and 8 split over 2 and 4 but not over 3
        (["cluster.min_workers=2", "cluster.num_workers=4", "engine.zero_stage=0"], "stage1.batch_size"),
    ],
)
def test_inconsistent_settings_are_refused(overrides, field, shards):
    cfg = resolve(load_config(CPU, [f"data.shards={shards}", *overrides]))
    with pytest.raises(ConfigError) as e:
        check(cfg)
    assert e.value.field == field


def test_elastic_range_is_checked_at_every_world_size(shards):
    cfg = resolve(load_config(CPU, [f"data.shards={shards}", "cluster.min_workers=1", "cluster.num_workers=4",
                                    "engine.zero_stage=0", "stage1.batch_size=12", "stage2.batch_size=12"]))
    assert cfg.elastic and list(cfg.world_sizes) == [1, 2, 3, 4]
    check(cfg)  # 12 splits over 1, 2, 3 and 4 workers
    three = resolve(load_config(CPU, [f"data.shards={shards}", "cluster.min_workers=2", "cluster.num_workers=3",
                                      "engine.zero_stage=0"]))
    with pytest.raises(ConfigError, match=r"over 3 workers.*2\.\.3 workers, so the global batch must be a multiple of 6"):
        check(dataclasses.replace(three, stage1=dataclasses.replace(three.stage1, batch_size=4)))
    fixed = resolve(load_config(CPU, [f"data.shards={shards}", "cluster.min_workers=2"]))  # min == num: fixed
    assert not fixed.elastic and list(fixed.world_sizes) == [2]


def test_missing_shards_are_refused(tmp_path):
    cfg = resolve(load_config(CPU, [f"data.shards={tmp_path / 'none'}"]))
    with pytest.raises(ConfigError, match="^data.shards:"):
        check(cfg)


def test_stage2_alone_needs_priors_of_this_class_map(shards, tmp_path):
    """Stage 2 without stage 1: priors must exist and be trained on the shards' class map and preset."""
    from facesr.models import build_prior, get_preset
    from facesr.weights import save_priors
    from shards.manifest import read_manifest

    base = [f"data.shards={shards}", "run.stages=[2]"]
    with pytest.raises(ConfigError, match="^stage2.priors: .*no trained priors"):
        check(resolve(load_config(CPU, base + [f"stage2.priors={tmp_path / 'missing.safetensors'}"])))

    classes = read_manifest(shards)["classes"]
    prior = get_preset("tiny").prior
    for name, cls in (("other", classes[:-1] + ["Someone_Else"]), ("same", classes)):
        save_priors(tmp_path / f"{name}.safetensors", {k: build_prior(prior, len(cls)) for k in ("x2", "x4", "hr")},
                    prior, cls)
    with pytest.raises(ConfigError, match="^stage2.priors: .*another class map"):
        check(resolve(load_config(CPU, base + [f"stage2.priors={tmp_path / 'other.safetensors'}"])))
    with pytest.raises(ConfigError, match="^stage2.priors: .*preset 'paper'"):
        check(resolve(load_config(CPU, base + ["preset=paper", f"stage2.priors={tmp_path / 'same.safetensors'}"])))
    check(resolve(load_config(CPU, base + [f"stage2.priors={tmp_path / 'same.safetensors'}"])))


def test_resolve_makes_paths_absolute_and_puts_the_run_under_storage(tmp_path):
    cfg = resolve(load_config(CPU, ["run.name=abc", "cluster.storage_path=some/where"]), base=tmp_path)
    assert cfg.run.run_dir == str(tmp_path / "some/where/abc")
    assert cfg.data.shards == str(tmp_path / "data/shards/demo")
    assert cfg.priors_path == tmp_path / "some/where/abc/priors.safetensors"


def test_cli_config_error_exits_before_ray_starts():
    """`python -m launch.train` with a bad key exits 2 naming the field, without starting Ray."""
    res = subprocess.run([sys.executable, "-m", "launch.train", "--config", str(CPU), "stage2.nope=1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "stage2.nope" in res.stderr
    assert "ray" not in res.stderr.lower().replace("ray job", "")


def test_default_config_is_the_papers_schedule():
    """Without a file the dataclass defaults already carry the paper's optimiser settings."""
    cfg = TrainConfig()
    assert cfg.stage1.lr == 1e-4 and cfg.stage2.lr_milestones == [10, 25, 50, 80]


@pytest.mark.parametrize("gpus", [16, 32, 64])
def test_scale_yaml_splits_over_16_to_64_gpus(gpus):
    """scale.yaml's global batches split over 16, 32 and 64 GPUs within its micro-batch limits, with a warm-up,
    sqrt-scaled learning rates and BatchNorm per GPU (8 images at 32 GPUs: the paper's BN batch)."""
    from cluster.config import accumulation

    cfg = load_config(ROOT / "launch" / "configs" / "scale.yaml", [f"cluster.num_workers={gpus}"])
    for s, base_lr, base_batch in ((cfg.stage1, 1e-4, 128), (cfg.stage2, 10 / 3 * 1e-3, 8)):
        micro, accum = accumulation(s.batch_size, gpus, s.max_micro_batch)
        assert micro * accum * gpus == s.batch_size and micro >= 4  # BN sees >= 4 images per GPU even unsynced
        assert s.lr == pytest.approx(base_lr * (s.batch_size / base_batch) ** 0.5) and s.warmup_steps > 0
    assert cfg.engine.batchnorm == "local" and cfg.cluster.use_gpu


def test_warmup_rises_linearly_then_follows_the_epoch_schedule():
    """lr_at(epoch, step) ramps over warmup_steps optimizer steps, then is the per-epoch value."""
    s = load_config(None, ["stage2.warmup_steps=4"]).stage2
    assert [s.lr_at(0, k) / s.lr for k in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])
    assert s.lr_at(10, 100) == pytest.approx(s.lr / 3)


@pytest.mark.parametrize(
    "section,kwargs,field",
    [
        ("RunConfig", {"stages": [4]}, "run.stages"),
        ("RunConfig", {"stages": [1, 3]}, "run.stages"),  # the gate needs the cascade stage 2 trains
        ("GateStageConfig", {"strength": 0.0}, "stage3.strength"),
        ("GateStageConfig", {"target_max": float("nan")}, "stage3.target_max"),
        ("DataConfig", {"degradation": "nope"}, "data.degradation"),
        ("ClusterConfig", {"num_workers": 0}, "cluster.num_workers"),
        ("EngineConfig", {"precision": "fp16"}, "engine.precision"),
        ("PriorStageConfig", {"crop_pad": -1}, "stage1.crop_pad"),
        ("SRStageConfig", {"lr": 0.0}, "stage2.lr"),
        ("SRStageConfig", {"steps_per_epoch": -1}, "stage2.steps_per_epoch"),
    ],
)
def test_each_section_checks_its_own_values(section, kwargs, field):
    """A section's validate() refuses its own impossible values on its own, naming the dotted key."""
    import cluster.config as config

    obj = getattr(config, section)(**kwargs)
    key = field.split(".")[0]
    with pytest.raises(ConfigError) as e:
        obj.validate(key)
    assert e.value.field == field


def test_a_stage_s_own_steps_cap_overrides_data_s(shards):
    """``stageN.steps_per_epoch`` caps that stage alone (0 = the whole split), where ``data.steps_per_epoch`` caps
    both: identity-term.yaml trains its recognizer on whole epochs under the demo's 60-step stage 2."""
    from cluster.progress import planned_steps
    from shards.manifest import read_manifest

    m = read_manifest(shards)
    full = resolve(load_config(CPU, [f"data.shards={shards}"]))
    capped = resolve(load_config(CPU, [f"data.shards={shards}", "data.steps_per_epoch=1"]))
    own = resolve(load_config(CPU, [f"data.shards={shards}", "data.steps_per_epoch=1", "stage1.steps_per_epoch=0",
                                    "stage2.steps_per_epoch=2"]))
    whole1, whole2 = planned_steps(full, 1, m), planned_steps(full, 2, m)
    assert whole1 > full.stage1.epochs and whole2 > 2 * full.stage2.epochs  # more than the caps below allow
    assert (planned_steps(capped, 1, m), planned_steps(capped, 2, m)) == (capped.stage1.epochs, capped.stage2.epochs)
    assert (planned_steps(own, 1, m), planned_steps(own, 2, m)) == (whole1, 2 * own.stage2.epochs)
    shipped = load_config("identity-term")
    assert (shipped.steps_cap(1), shipped.steps_cap(2)) == (0, shipped.data.steps_per_epoch) and shipped.steps_cap(2)


# ---------------------------------------------------------------- config files: defaults, names


def test_a_config_states_only_what_differs_from_its_defaults(tmp_path):
    """`defaults: [NAME]` merges the named configs first (beside the file, else packaged), depth first, then the
    file itself: a file holding one change is the named config with that change, as an override would give."""
    (tmp_path / "base.yaml").write_text("defaults: [demo]\nstage2:\n  epochs: 4\n")
    (tmp_path / "child.yaml").write_text("defaults: base\nrun:\n  name: child\n")
    child = load_config(tmp_path / "child.yaml")
    same = load_config("demo", ["stage2.epochs=4", "run.name=child"])
    assert child == same and child.stage2.epochs == 4 and child.data.degradation == "robust_nojpeg"
    assert load_config(tmp_path / "child.yaml", ["stage2.epochs=5"]).stage2.epochs == 5  # overrides come last


def test_packaged_configs_are_found_by_name():
    assert load_config("demo") == load_config(ROOT / "launch/configs/demo.yaml") == load_config("demo.yaml")
    with pytest.raises(ConfigError, match=r"^--config: dmeo: no such file \(nor a packaged config: .*\bdemo\b"):
        load_config("dmeo")


@pytest.mark.parametrize("text,pattern", [
    ("defaults: [nope]\n", r"^--config: nope: no such file"),
    ("defaults: {demo: 1}\n", r"^defaults: .*expected a list of config names"),
    ("defaults: [loop]\n", r"^defaults: .*loop\.yaml: loop is already being loaded \(a cycle\)"),
])
def test_bad_defaults_are_refused_naming_them(tmp_path, text, pattern):
    (tmp_path / "loop.yaml").write_text(text)
    with pytest.raises(ConfigError, match=pattern):
        load_config(tmp_path / "loop.yaml")


def test_shipped_configs_inherit_and_hold_only_what_differs():
    """Every shipped config loads and validates; the ones built on others (`defaults:`) restate nothing their
    defaults already give (but its run's name), so a change to a shared setting is made in one place."""
    from cluster.config import _file_layers, _read_yaml, find_config, packaged_configs
    from facesr.structured import build

    names = packaged_configs()
    assert {"local", "cpu", "demo", "paper", "scale", "table1-csrip"} <= set(names)
    inheriting = 0
    for name in names:
        load_config(name).validate()
        path = find_config(name)
        own = _read_yaml(path)
        parents = own.pop("defaults", None)
        if parents is None:
            continue
        inheriting += 1
        layers = [layer for n in ([parents] if isinstance(parents, str) else parents)
                  for layer in _file_layers(find_config(n, near=path.parent))]
        base = build(TrainConfig, *layers).to_dict()
        repeated = [f"{section}.{k}" for section, values in own.items() if isinstance(values, dict)
                    for k, v in values.items() if base[section][k] == v and f"{section}.{k}" != "run.name"]
        repeated += [k for k, v in own.items() if not isinstance(v, dict) and base[k] == v]
        assert not repeated, f"{name}.yaml restates what its defaults give: {repeated}"
    assert inheriting >= 10  # all but the two roots (local, paper)


def test_stage1_takes_its_own_shards_where_named(shards, tmp_path):
    """stage1.shards: stage 1 streams and takes its class map from that set, stage 2 from data.shards; a missing
    set is refused naming stage1.shards; priors trained on another class map than the one stage 2's
    cross-entropy labels with are refused before Ray starts, a recognizer is not (stage 2 only embeds)."""
    from cluster.data import build_loader, read_classes
    from shards.manifest import read_manifest
    from shards.plan import SplitConfig
    from shards.prep import PrepConfig, prepare

    other = tmp_path / "other"
    prepare(PrepConfig(src=str(shards.parent / "src"), out=str(other), shard_size=16, progress=False,
                       split=SplitConfig(by="none", min_images=2)))
    mine, theirs = read_manifest(shards)["classes"], read_manifest(other)["classes"]
    assert mine != theirs
    base = [f"data.shards={shards}", "data.loader_workers=0", "stage1.batch_size=8", "stage1.max_micro_batch=8"]
    rec = resolve(load_config(CPU, [*base, f"stage1.shards={other}", "stage1.model=recognizer", "stage2.alpha=0",
                                    "stage2.identity_weight=0.1"]))
    manifests = check(rec)
    assert manifests[1]["classes"] == theirs and manifests[2]["classes"] == mine
    assert (read_classes(rec, 1), read_classes(rec, 2)) == (theirs, mine)
    cls = torch.cat([b["cls"] for b in build_loader(rec, 1, "train", 8, 0, 1, 0)])
    assert len(cls) == 8 * (read_manifest(other)["splits"]["train"]["labelled"] // 8)  # every labelled face of it
    assert set(cls.tolist()) == set(range(len(theirs))) and len(theirs) > len(mine)  # labels of its own map
    with pytest.raises(ConfigError, match="^stage1.shards: .*no such folder"):
        check(resolve(load_config(CPU, [*base, f"stage1.shards={tmp_path / 'none'}"])))
    with pytest.raises(ConfigError, match="^stage1.shards: .*another class map"):
        check(resolve(load_config(CPU, [*base, f"stage1.shards={other}"])))  # priors whose CE stage 2 uses
    check(resolve(load_config(CPU, [*base, f"stage1.shards={other}", "run.stages=[1]"])))  # priors for later
