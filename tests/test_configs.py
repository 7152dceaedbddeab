"""Every Hydra config of conf/ composes; typos fail with Hydra's message naming the valid choices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from icsk.cli import CONF_DIR
from icsk.config import compose
from icsk.experiment import ConfigError, resolve_device, run

# conf/hydra/launcher/joblib.yaml shares the plugin's name on purpose; Hydra 1.3 notes that it
# matches the plugin's schema (see icsk.sweep.quiet_launcher_schema_warning)
pytestmark = pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/\w+' is validated against ConfigStore schema")

GROUPS = ["model", "data", "optim", "recorder", "metrics", "logger"]
PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
SWEEP_PRESETS = ["lr_sweep", "init_sweep", "batch_sweep"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_full(overrides: list[str]):
    """Job config with the hydra node (presets set hydra.sweeper.params; launchers live there)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_presets_and_groups_are_found():
    assert {"demo", "ioffe_mnist", "santurkar_vgg", "santurkar_dln", *SWEEP_PRESETS} <= set(PRESETS)
    for g in GROUPS:
        assert options(g), g
    assert {"joblib", "slurm"} <= set(options("hydra/launcher"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_resolves(preset):
    full = compose_full([f"experiment={preset}"])
    assert full.name == preset  # the preset names its run folders and wandb group
    job = compose([f"experiment={preset}"])
    plain = OmegaConf.to_container(job, resolve=True)  # exactly what experiment.run saves and logs
    assert plain["name"] == preset
    assert plain["logger"]["group"] == preset
    assert plain["train"]["steps"] > 0
    # the hydra node (sweep dir, launcher, callbacks) resolves as well
    assert str(full.hydra.sweep.dir).startswith(f"multirun/{preset}/")
    assert full.hydra.callbacks.sweep_summary._target_ == "icsk.sweep.SweepSummary"


@pytest.mark.parametrize("preset", SWEEP_PRESETS)
def test_sweep_presets_sweep_existing_keys_with_valid_values(preset):
    full = compose_full([f"experiment={preset}"])
    params = full.hydra.sweeper.params
    assert params, f"{preset} sets no hydra.sweeper.params"
    for key, values in params.items():
        choices = [v.strip() for v in str(values).split(",")]
        assert len(choices) >= 3, (key, values)
        assert OmegaConf.select(full, key, default="<absent>") != "<absent>", f"{preset} sweeps unknown key {key}"
        for v in choices:  # every job of the sweep composes and keeps the value's type
            job = compose([f"experiment={preset}", f"{key}={v}"])
            assert float(OmegaConf.select(job, key)) == pytest.approx(float(v))
    # CPU-sized demo: the offline 5k digits and an MLP, at most a few thousand steps
    job = compose([f"experiment={preset}"])
    assert job.data.name == "mnist5k" and job.model.name == "mlp"
    assert 100 <= job.train.steps <= 5000


def test_batch_sweep_enables_the_running_statistics_gap():
    job = compose(["experiment=batch_sweep"])
    assert job.metrics.bn_gap.enabled and int(job.metrics.bn_gap.schedule) > 0
    assert "bn" in list(job.model.arms)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    cfg = compose([f"{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True)
    yaml_name = OmegaConf.load(CONF_DIR / group / f"{option}.yaml").get("name")
    if yaml_name is not None:  # the option chosen is the option composed
        assert cfg[group].name == yaml_name


@pytest.mark.parametrize("launcher", ["joblib", "slurm", "submitit_local", "submitit_slurm", "basic"])
def test_every_launcher_composes(launcher, tmp_path):
    full = compose_full([f"hydra/launcher={launcher}", f"hydra.sweep.dir={tmp_path}"])
    params = OmegaConf.to_container(full.hydra.launcher, resolve=True)
    assert params["_target_"].startswith(("hydra_plugins.", "hydra._internal."))
    if launcher == "joblib":
        assert params["n_jobs"] == -1 and params["_target_"].endswith("JoblibLauncher")
    if launcher == "slurm":
        assert params["_target_"].endswith("SlurmLauncher")
        assert params["submitit_folder"] == f"{tmp_path}/.submitit/%j"
        assert params["partition"] is None and params["timeout_min"] > 0 and params["array_parallelism"] > 0


def test_joblib_jobs_from_the_environment(monkeypatch):
    monkeypatch.setenv("ICSK_N_JOBS", "3")
    full = compose_full(["hydra/launcher=joblib"])
    assert full.hydra.launcher.n_jobs == 3


def test_a_config_group_typo_lists_the_valid_choices():
    with pytest.raises(MissingConfigException) as err:
        compose(["model=mlpp"])
    msg = str(err.value)
    assert "Could not find 'model/mlpp'" in msg
    assert "Available options" in msg
    for o in options("model"):
        assert o in msg


def test_a_key_typo_names_the_key_and_how_to_add_one():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["optim.lrr=1"])
    msg = str(err.value) + str(err.value.__cause__)
    assert "Could not override 'optim.lrr'" in msg
    assert "Key 'lrr' is not in struct" in msg
    assert "+optim.lrr=1" in msg


def test_a_preset_typo_lists_the_presets():
    with pytest.raises(MissingConfigException) as err:
        compose(["experiment=lr_swep"])
    msg = str(err.value)
    for p in PRESETS:
        assert p in msg


def test_a_launcher_typo_lists_the_launchers():
    with pytest.raises(MissingConfigException) as err:
        compose_full(["hydra/launcher=jobllib"])
    msg = str(err.value)
    assert "joblib" in msg and "slurm" in msg


def test_the_cli_reports_a_typo_and_exits_nonzero(tmp_path):
    exe = Path(sys.executable).parent / "icsk-train"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from icsk.cli import train_main; train_main()"]
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    res = subprocess.run([*cmd, "model=mlpp", f"hydra.run.dir={tmp_path}/run"], capture_output=True, text=True,
                         env=env, timeout=120, cwd=tmp_path)
    assert res.returncode != 0
    assert "Could not find 'model/mlpp'" in res.stderr
    assert "mlp" in res.stderr and "vgg" in res.stderr
    assert not (tmp_path / "run").exists()
    res = subprocess.run([*cmd, "optim.lr=-1", f"hydra.run.dir={tmp_path}/run"], capture_output=True, text=True,
                         env=env, timeout=120, cwd=tmp_path)
    assert res.returncode == 1 and res.stderr.startswith("icsk-train: optim.lr must be > 0")
    assert "Traceback" not in res.stderr
    res = subprocess.run([*cmd, "resume=true", f"hydra.run.dir={tmp_path}/typo"], capture_output=True, text=True,
                         env=env, timeout=120, cwd=tmp_path)  # a mistyped folder: nothing to resume
    assert res.returncode == 1 and res.stderr.startswith(f"icsk-train: resume=true, but {tmp_path}/typo holds no run")
    assert not (tmp_path / "typo" / "arms").exists()


# ---------------------------------------------------------------------- refused values: the key and the fix
RUN = ["logger=none", "train.progress=false", "train.steps=2", "train.eval_every=0"]


def refused(tmp_path: Path, *overrides: str) -> str:
    """The ConfigError message of a run with ``overrides``, after checking that it wrote nothing."""
    with pytest.raises(ConfigError) as err:
        run(compose([*RUN, *overrides]), tmp_path / "run")
    assert list((tmp_path / "run").iterdir()) == []
    return str(err.value)


@pytest.mark.parametrize("value,says", [("fixed", 'must be "auto" or a pair (lo, hi) of numbers'),
                                         ("[1,0]", "needs finite lo < hi"), ("[0,1,2]", "got [0, 1, 2]")])
def test_a_bad_histogram_range_names_the_key_and_the_fix(tmp_path, value, says):
    msg = refused(tmp_path, f"recorder.hist_range={value}")
    assert msg.startswith("recorder: hist_range") and says in msg


@pytest.mark.parametrize("model", ["mlp", "vgg"])
def test_a_classifier_on_regression_data_points_to_the_deep_linear_net(tmp_path, model):
    msg = refused(tmp_path, f"model={model}", "data=gaussian")
    assert msg.startswith("data=gaussian is regression data") and "use model=dln" in msg
    assert f"a classification dataset (e.g. data=mnist5k) for model={model}" in msg


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu:zero"])
def test_an_unknown_device_names_the_key_and_the_valid_values(tmp_path, device):
    msg = refused(tmp_path, f"device={device}")
    assert msg.startswith(f"device={device!r} is not a device")
    assert msg.endswith("use device=auto (cuda when available, else mps, else cpu), cpu, cuda, cuda:N (GPU number N) "
                        "or mps")


def test_a_gpu_number_beyond_the_machines_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"device='cuda:2' but this machine has 2 GPU\(s\); use device=cuda"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("model,own", [("mlp", []), ("vgg", ["channels"]), ("dln", [])])
def test_an_unknown_model_option_names_the_key_and_lists_the_valid_ones(tmp_path, model, own):
    msg = refused(tmp_path, f"model={model}", *(["data=gaussian"] if model == "dln" else []), "+model.options.foo=1")
    head, _, valid = msg.partition(": remove it or use a valid model.options name: ")
    assert head == f"unknown model.options.foo for model={model}"
    assert valid.split(", ") == ["eps", "momentum", "gn_groups", "lp_p", "affine", *own]


def test_a_misspelt_data_option_names_the_key_and_the_spelling(tmp_path):
    msg = refused(tmp_path, "+data.options.standardise=false")
    assert msg == ("unknown data.options.standardise for data=mnist5k (did you mean data.options.standardize?): "
                   "remove it or use a valid data.options name: flatten, standardize")
    msg = refused(tmp_path, "model=dln", "data=gaussian", "+data.options.foo=1")
    assert msg.endswith("for data=gaussian: remove it or use a valid data.options name: dim, n_train, n_test, "
                        "data_seed")


def test_an_unknown_recorder_key_is_refused_and_the_documented_ones_reach_the_recorder(tmp_path):
    """Recorder options that the job dropped silently (+recorder.zero_eps=0.5 ran with 1e-6)."""
    msg = refused(tmp_path, "+recorder.zero_epz=0.5")
    assert msg.startswith("unknown recorder.zero_epz for the Recorder (did you mean recorder.zero_eps?)")
    assert "recorder.modes" in refused(tmp_path, "+recorder.modes=[train,eval]")  # evaluation runs paused
    run(compose([*RUN, "model.arms=[none]", "recorder.zero_eps=0.5", "recorder.hist_margin=0.25"]), tmp_path / "ok")
    meta = json.loads((tmp_path / "ok" / "arms" / "none" / "stats" / "recorder.json").read_text())
    assert meta["zero_eps"] == 0.5


def test_an_unknown_normalizer_or_a_bad_schedule_names_its_config_key(tmp_path):
    assert refused(tmp_path, "model.arms=[bn,foo]").startswith("model.arms: unknown normalizer(s) ['foo']; valid: none, bn")
    assert refused(tmp_path, "model.norm=btach").startswith("model.norm: unknown normalizer(s) ['btach']")
    assert refused(tmp_path, "recorder.schedule=log:x").startswith("recorder.schedule=log:x: ")
    assert refused(tmp_path, "recorder.probe_schedule=-5").startswith("recorder.probe_schedule=-5: ")


def test_a_key_added_that_no_config_sets_is_refused(tmp_path):
    """``+optim.momentun=0.9`` ran with momentum 0 and said nothing."""
    assert refused(tmp_path, "+optim.momentun=0.9").startswith(
        "unknown optim.momentun for optim=sgd (did you mean optim.momentum?): remove it or use a valid optim name: "
        "name, lr, ")
    assert refused(tmp_path, "+train.stepz=5").startswith("unknown train.stepz for the training loop (did you mean "
                                                          "train.steps?)")
    assert refused(tmp_path, "+model.dept=5").startswith("unknown model.dept for model=mlp (did you mean model.depth?)")
    assert refused(tmp_path, "+data.batchsize=5").startswith("unknown data.batchsize for data=mnist5k")
    # a key of another option of the group reaches no code either (Adam has no momentum, VGG no depth)
    assert refused(tmp_path, "optim=adam", "+optim.momentum=0.9").startswith("unknown optim.momentum for optim=adam")
    assert refused(tmp_path, "model=cnn", "+model.depth=9").startswith("unknown model.depth for model=vgg")
    assert refused(tmp_path, "model=mlp", "+model.variant=vgg11").startswith("unknown model.variant for model=mlp")
    assert refused(tmp_path, "metrics=santurkar", "+metrics.ics.shedule=5").startswith(
        "unknown metrics.ics.shedule for the ics probe (did you mean metrics.ics.schedule?)")
    assert refused(tmp_path, "+metrics.icss={enabled: true}").startswith("unknown metrics.icss for the online metrics")


def test_bad_recorder_model_and_data_values_are_config_errors(tmp_path):
    """A one-line icsk-train error that names what to fix, not Hydra's traceback of a bare error."""
    assert refused(tmp_path, "recorder.stats=[mean,variance]").startswith(
        "recorder: unknown statistic(s) ['variance']; choose from ['mean', 'var'")
    assert "nearest valid names: ['block3.pre_act'" in refused(tmp_path, "recorder.layers=[block*.preact]")
    assert refused(tmp_path, "recorder.capture=inputs") == "recorder: capture must be 'output' or 'input', got 'inputs'"
    assert refused(tmp_path, "model.activation=sigmod").startswith("model=mlp: unknown activation 'sigmod'")
    msg = refused(tmp_path, "data=mnist", f"data.root={tmp_path / 'nodata'}")
    assert msg.startswith("mnist: files") and "data.download=true" in msg
    assert refused(tmp_path, "optim.nesterov=true").startswith("optim=sgd: Nesterov momentum requires a momentum")
    assert refused(tmp_path, "optim=adam", "optim.betas=[0.9]") == "optim=adam: optim.betas must hold two values, got [0.9]"
    assert refused(tmp_path, "train.eval_batch_size=0") == "train.eval_batch_size must be an integer >= 1, got 0"
    assert refused(tmp_path, "model.arms=[none]", "data.batch_size=0").startswith("data.batch_size must be >= 1 or None (full batch), got 0")
    msg = refused(tmp_path, "model=dln", "data=gaussian", "model.arms=[bn]", "data.options.n_train=1")
    assert msg.startswith("arms ['bn'] normalize over the batch and cannot train with 1 training example(s)")
    if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        assert refused(tmp_path, "device=mps").startswith("device='mps' but MPS (Apple's GPU) is not available")


def test_valid_options_still_reach_the_model_and_the_data(tmp_path):
    from icsk.experiment import build_arms_models, load_data

    cfg = compose([*RUN, "model.arms=[bn]", "model.depth=1", "model.width=4", "+model.options.momentum=0.5",
                   "+data.options.standardize=true"])
    bundle = load_data(cfg)
    assert bundle.meta["standardized"] is True
    assert build_arms_models(cfg, bundle)["bn"].block1.norm.momentum == 0.5
