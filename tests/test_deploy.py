"""The cluster files in deploy/: launcher configs valid against the schema inside the ray package, KubeRay
manifests with the fields KubeRay needs, entrypoints whose arguments are valid vemscale configs, no
credentials in any file, a Dockerfile that puts jobs where the manifests run them, and a small
`--working-dir .` package."""

from __future__ import annotations

import copy
import json
import re
import shlex
import tempfile
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from conftest import ROOT
from vemscale.config import build_config
from vemscale.infer.run import load_infer_config

DEPLOY = ROOT / "deploy"
LAUNCHER = {"aws": DEPLOY / "cluster" / "aws-gpu.yaml", "gcp": DEPLOY / "cluster" / "gcp-gpu.yaml"}
KUBERAY = {p.stem: p for p in sorted((DEPLOY / "kuberay").glob("*.yaml"))}
WORKDIR = "/home/ray/vemscale"  # the image's WORKDIR, where the head runs job entrypoints
CREDENTIAL_NAMES = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)


def ray_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# --- `ray up` configs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_launcher_config_is_valid_for_ray(cloud):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER[cloud].read_text())
    jsonschema.validate(config, ray_schema())  # as written
    validate_config(prepare_config(copy.deepcopy(config)))  # as `ray up` fills and checks it
    assert config["provider"]["type"] == cloud


def test_the_schema_check_is_strict():
    config = yaml.safe_load(LAUNCHER["aws"].read_text())
    bad = {**config, "max_worker": 8}  # a misspelt key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema())
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_worker"]["resources"] = {"GPU": -1}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema())


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_launcher_config_has_a_work_free_head_autoscaled_gpu_workers_and_installs_vemscale(cloud):
    config = yaml.safe_load(LAUNCHER[cloud].read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert len(workers) == 1
    (gpu,) = workers.values()
    assert 0 == gpu["min_workers"] < gpu["max_workers"] <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0
    if cloud == "aws":
        assert re.match(r"(g\d|p\d)", gpu["node_config"]["InstanceType"])  # a GPU instance family
    else:
        assert gpu["resources"]["GPU"] >= 1 and gpu["node_config"]["guestAccelerators"][0]["acceleratorCount"] >= 1
        assert {"onHostMaintenance": "TERMINATE"} in gpu["node_config"]["scheduling"]
    assert config["file_mounts"] == {WORKDIR: "."}
    assert any(re.search(rf"pip install .*{WORKDIR}\b", c) for c in config["setup_commands"])
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert "--dashboard-host=0.0.0.0" not in " ".join(config["head_start_ray_commands"])  # reached via `ray dashboard`


# --- KubeRay manifests -----------------------------------------------------------------------------------------


def ray_objects() -> list[tuple[str, dict]]:
    return [(name, d) for name, path in KUBERAY.items() for d in load_docs(path) if d["apiVersion"] == "ray.io/v1"]


def cluster_spec(obj: dict) -> dict:
    return obj["spec"] if obj["kind"] == "RayCluster" else obj["spec"]["rayClusterSpec"]


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_kuberay_files_hold_the_expected_objects():
    kinds = {name: sorted(d["kind"] for d in load_docs(path)) for name, path in KUBERAY.items()}
    assert kinds == {"raycluster": ["RayCluster"], "rayjob-finetune": ["ConfigMap", "PersistentVolumeClaim", "RayJob"],
                     "rayjob-infer": ["RayJob"]}
    for _, obj in ray_objects():
        assert obj["apiVersion"] == "ray.io/v1" and obj["metadata"]["name"].startswith("vemscale")


@pytest.mark.parametrize("name", ["raycluster", "rayjob-infer", "rayjob-finetune"])
def test_ray_cluster_spec_has_a_head_and_an_autoscaled_gpu_group(name):
    (obj,) = [o for n, o in ray_objects() if n == name]
    spec = cluster_spec(obj)
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head runs drivers, not blocks
    (head_container,) = containers(head["template"])
    assert head_container["workingDir"] == WORKDIR
    assert {p["containerPort"] for p in head_container["ports"]} >= {6379, 8265}
    (group,) = spec["workerGroupSpecs"]
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and group["maxReplicas"] >= 1
    (worker,) = containers(group["template"])
    limits, requests = worker["resources"]["limits"], worker["resources"]["requests"]
    assert int(limits["nvidia.com/gpu"]) >= 1 and requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
    tolerations = group["template"]["spec"].get("tolerations", [])
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    images = {c["image"] for c in [head_container, worker]}
    assert images == {"REGISTRY/vemscale:0.1.0"}


def test_storage_credentials_come_from_a_secret_only():
    for name, obj in ray_objects():
        spec = cluster_spec(obj)
        templates = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
        for template in templates:
            for c in containers(template):
                env = {e["name"]: e for e in c.get("env", [])}
                for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"):
                    assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "vemscale-storage", "key": var,
                                                                     "optional": True}, (name, var)
                for e in env.values():
                    if CREDENTIAL_NAMES.search(e["name"]):
                        assert "value" not in e, (name, e["name"])
    for path in [*KUBERAY.values(), *LAUNCHER.values(), DEPLOY / "Dockerfile", ROOT / "README.md"]:
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), path  # nothing shaped like an AWS access key id
        assert not re.search(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{30,}", text), path


def entrypoint_args(job: dict) -> tuple[str, list[str]]:
    """(script, arguments) of `python jobs/<stage>.py ...`, resolved against the repository as the head's WORKDIR."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1].startswith("jobs/")
    assert (ROOT / argv[1]).is_file()
    return argv[1], argv[2:]


def test_infer_rayjob_entrypoint_is_a_valid_infer_config_on_s3():
    (job,) = [o for n, o in ray_objects() if n == "rayjob-infer"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0
    script, args = entrypoint_args(job)
    assert script == "jobs/infer.py" and args[0] == "configs/infer.yaml"
    cfg = load_infer_config([str(ROOT / args[0]), *args[1:]])
    assert cfg.input.startswith("s3://") and cfg.output.startswith("s3://") and cfg.checkpoint.startswith("s3://")
    assert cfg.num_gpus_per_worker == 1  # explicit: the cluster may start with no GPU node
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = containers(group["template"])[0]["resources"]["limits"]
    assert cfg.workers <= group["maxReplicas"] * int(limits["nvidia.com/gpu"])  # one GPU per actor
    assert cfg.threads_per_worker <= int(limits["cpu"])


def test_finetune_rayjob_runs_its_configmap_with_run_dir_on_the_shared_volume():
    from vemscale.train.finetune import FinetuneConfig

    docs = {d["kind"]: d for d in load_docs(KUBERAY["rayjob-finetune"])}
    job, config_map, claim = docs["RayJob"], docs["ConfigMap"], docs["PersistentVolumeClaim"]
    script, args = entrypoint_args(job)
    assert script == "jobs/finetune.py" and len(args) == 1
    mount_dir, key = args[0].rsplit("/", 1)
    cfg = build_config(FinetuneConfig, yaml.safe_load(config_map["data"][key]))
    assert cfg.train.use_gpu is True and cfg.train.cpus_per_worker and cfg.train.workers >= 1
    assert all(s.image.startswith("s3://") and s.labels.startswith("s3://") for s in [*cfg.data.train, *cfg.data.val])
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert set(runtime_env) == {"env_vars"} and all(isinstance(v, str) for v in runtime_env["env_vars"].values())

    spec = job["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    assert volumes[mounts[mount_dir]]["configMap"]["name"] == config_map["metadata"]["name"]
    # run_dir is on the claim, mounted at the same path on the head and on every worker (Ray Train storage)
    for template in [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]:
        vols = {v["name"]: v for v in template["spec"]["volumes"]}
        shared = [m for m in template["spec"]["containers"][0]["volumeMounts"]
                  if vols[m["name"]].get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]]
        assert len(shared) == 1 and str(cfg.run_dir).startswith(shared[0]["mountPath"] + "/")
    (group,) = spec["workerGroupSpecs"]
    assert cfg.train.workers <= group["maxReplicas"]


# --- the image --------------------------------------------------------------------------------------------------


def test_dockerfile_installs_vemscale_on_the_ray_gpu_image_with_jobs_in_the_workdir():
    text = (DEPLOY / "Dockerfile").read_text()
    assert f"ARG RAY_IMAGE=rayproject/ray:{ray.__version__}-py311-gpu" in text and "FROM ${RAY_IMAGE}" in text
    assert f"WORKDIR {WORKDIR}" in text
    copies = re.findall(r"^COPY (?:--chown=\S+ )?(.+) (\S+)$", text, re.MULTILINE)
    copied = {src for sources, _ in copies for src in sources.split()}
    assert {"pyproject.toml", "README.md", "vemscale", "configs", "jobs"} <= copied
    assert re.search(r"^RUN pip install \.", text, re.MULTILINE)
    for src in copied:  # everything copied exists and is not cut out of the build context
        assert (ROOT / src).exists(), src
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:] and all(f"!{src}" in ignore or f"!{src}/" in ignore for src in copied)
    assert not re.search(r"^(ENV|ARG) .*(KEY|SECRET|TOKEN)", text, re.MULTILINE | re.IGNORECASE)


# --- `ray job submit --working-dir .` ---------------------------------------------------------------------------


def test_working_dir_package_is_small_and_holds_what_jobs_need():
    """The zip `ray job submit --working-dir .` uploads (Ray's own packaging, honouring .gitignore/.rayignore)."""
    from ray._private.runtime_env.packaging import _zip_files

    with tempfile.TemporaryDirectory() as d:
        pkg = Path(d) / "pkg.zip"
        _zip_files(str(ROOT), [], str(pkg), include_gitignore=True)
        names = zipfile.ZipFile(pkg).namelist()
        size = pkg.stat().st_size
    assert size < 5 * 2**20, f"{size / 2**20:.1f} MiB"  # Ray's limit is 100 MiB
    assert {"jobs/infer.py", "jobs/finetune.py", "configs/infer.yaml", "vemscale/__init__.py"} <= set(names)
    tops = {n.split("/")[0] for n in names}
    assert not tops & {".venv", ".git", "runs", "tests", "deploy", "docs", ".pytest_cache"}
    assert not any(n.endswith(".pyc") or ".zarr/" in n for n in names)


# --- the walkthrough --------------------------------------------------------------------------------------------


def test_cluster_readme_names_existing_files_and_valid_infer_commands():
    text = (ROOT / "README.md").read_text()
    text = text[text.index("## Run on a cluster"):]
    for path in set(re.findall(r"\bdeploy/[\w./-]+\.(?:yaml|md|\w+)\b|\bdeploy/Dockerfile\b", text)):
        assert (ROOT / path).exists(), path
    commands = re.findall(r"python jobs/infer\.py configs/infer\.yaml((?:\\\n|[^\n`])*)", text)
    assert commands
    for tail in commands:
        items = [i for i in shlex.split(tail.replace("\\\n", " ")) if "=" in i and not i.startswith("...")]
        # every key is an InferConfig key with a valid value (input/output/checkpoint stand in where elided)
        cfg = load_infer_config([str(ROOT / "configs" / "infer.yaml"), "input=s3://b/v", "output=s3://b/o",
                                 "checkpoint=s3://b/c", *items])
        assert cfg.input.startswith(("s3://", "gs://"))
