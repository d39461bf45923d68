"""The Databricks asset bundle (databricks.yml and resources/*.yml): its structure.

Every job resource is checked against Databricks' own job definitions, the dataclasses of the
``databricks-bundles`` package (``databricks.bundles.jobs``), twice:

* ``Job.from_dict`` builds the package's ``Job`` from the YAML mapping. It rejects unknown keys
  at every level, a missing required field, a list or mapping where the other is expected and
  an enum value it does not know, but it converts scalars as it goes (``str(1.5)``,
  ``int("2")``): a number where a string belongs passes.
* :func:`strict_problems` walks the mapping against the same dataclasses' type hints and
  accepts a value only of the declared type (or a whole ``${...}`` reference, resolved at
  deploy time), naming the closest known key for an unknown one.

:func:`job_problems` adds what neither checks within a job: task keys, ``depends_on`` and
``job_cluster_key`` references, one task type per task, and ``{{job.parameters.X}}``
references against the job's ``parameters``. The tests below then check the bundle as a whole:
declared ``${var.X}`` variables, the wheel tasks' package and entry point against
pyproject.toml, and each task's argv against ``clinlinker``'s own parser and config classes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import enum
import functools
import re
import tomllib
import types
import typing
import zoneinfo
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml
from databricks.bundles.core import Variable
from databricks.bundles.jobs import Job

from clinlinker_spark.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_FILE = ROOT / "databricks.yml"
BUNDLE_NAME = "clinlinker"
PACKAGE = "clinlinker_spark"
ENTRY_POINT = "clinlinker"
DRY_RUN = "--dry-run"

# ${...} references a bundle may use besides ${var.X}
BUNDLE_REFERENCES = {"workspace.file_path", "bundle.name", "bundle.target"}
TOP_LEVEL_KEYS = {"bundle", "include", "artifacts", "variables", "targets", "resources",
                  "workspace", "sync", "permissions", "run_as", "presets", "experimental",
                  "scripts", "python"}
ARTIFACT_KEYS = {"type", "build", "path", "files", "executable", "dynamic_version"}
VARIABLE_KEYS = {"description", "default", "type", "lookup"}
TARGET_KEYS = {"mode", "default", "workspace", "variables", "resources", "artifacts", "sync",
               "permissions", "run_as", "presets", "git", "cluster_id", "compute_id",
               "bundle"}
TARGET_MODES = {"development", "production"}
# config class each command loads --config / --set into
COMMAND_CONFIGS = {
    "link": "clinlinker_spark.config:JobConfig",
    "build-index": "clinlinker_spark.config:JobConfig",
    "variables": "clinlinker_spark.variables:VariablesJobConfig",
    "train-biencoder": "clinlinker_spark.training.config:BiEncoderTrainConfig",
}

_WHOLE_REFERENCE = re.compile(r"\$\{[^${}]+\}")
_REFERENCE = re.compile(r"\$\{([^${}]+)\}|\{\{\s*([^{}\s]+)\s*\}\}")
_VAR_REFERENCE = re.compile(r"\$\{var\.([A-Za-z0-9_-]+)\}")
_JOB_PARAMETER = re.compile(r"\{\{\s*job\.parameters\.([A-Za-z0-9_.-]+)\s*\}\}")
_TABLE_NAME = re.compile(r"[A-Za-z0-9_]+\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+")


# --------------------------------------------------------------------------------------------
# Loading


def _read_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path}: not a mapping at the top level"
    return data


def included_files() -> list[Path]:
    """The files databricks.yml's ``include`` globs name, sorted."""
    root = _read_yaml(BUNDLE_FILE)
    files: list[Path] = []
    for pattern in root.get("include", []):
        files += [p for p in sorted(ROOT.glob(pattern)) if p not in files]
    return files


@functools.lru_cache(maxsize=1)
def _load_bundle() -> dict[str, Any]:
    bundle = _read_yaml(BUNDLE_FILE)
    resources = bundle.setdefault("resources", {})
    for path in included_files():
        for kind, items in (_read_yaml(path).get("resources") or {}).items():
            merged = resources.setdefault(kind, {})
            for key, value in items.items():
                assert key not in merged, f"{path}: resources.{kind}.{key} is declared twice"
                merged[key] = value
    return bundle


def load_bundle() -> dict[str, Any]:
    """databricks.yml with the resources of every included file merged in (a fresh copy)."""
    return copy.deepcopy(_load_bundle())


def bundle_jobs() -> dict[str, dict[str, Any]]:
    """The bundle's job resources by key (fresh copies)."""
    return load_bundle()["resources"].get("jobs", {})


class BundleTask(NamedTuple):
    job_key: str
    task_key: str
    package_name: str | None  # None: not a python_wheel_task
    entry_point: str | None
    parameters: list[str]  # the task's argv, references unresolved
    job_parameters: dict[str, str]  # the job's parameters: name -> default


def bundle_tasks() -> list[BundleTask]:
    """Every task of every job in the bundle, in file order."""
    out = []
    for job_key, job in bundle_jobs().items():
        job_parameters = {p["name"]: p["default"] for p in job.get("parameters", [])}
        for task in job.get("tasks", []):
            wheel = task.get("python_wheel_task") or {}
            out.append(BundleTask(job_key, task["task_key"], wheel.get("package_name"),
                                  wheel.get("entry_point"), list(wheel.get("parameters", [])),
                                  job_parameters))
    return out


def reference_values(job_key: str | None = None, file_path: str | Path = ROOT,
                     variables: dict[str, Any] | None = None) -> dict[str, str]:
    """Values for :func:`substitute`: ``var.X`` for each declared variable (its default, or
    ``variables[X]``), ``workspace.file_path`` (the synced bundle root; here the repository),
    ``bundle.name``, and ``job.parameters.X`` for each parameter of job ``job_key``."""
    bundle = load_bundle()
    values = {f"var.{name}": str(spec.get("default", ""))
              for name, spec in bundle.get("variables", {}).items()}
    values.update({f"var.{k}": str(v) for k, v in (variables or {}).items()})
    values["workspace.file_path"] = str(file_path)
    values["bundle.name"] = bundle["bundle"]["name"]
    if job_key is not None:
        for p in bundle["resources"]["jobs"][job_key].get("parameters", []):
            values[f"job.parameters.{p['name']}"] = str(p["default"])
    return {name: substitute(value, values) for name, value in values.items()}


def substitute(value: Any, variables: dict[str, Any]) -> Any:
    """``value`` (a string, or lists and mappings of them) with its references replaced:
    ``${var.X}``, ``${workspace.file_path}`` and any other ``${NAME}`` by
    ``variables["var.X"]`` / ``variables["workspace.file_path"]`` / ``variables[NAME]``, and
    ``{{job.parameters.X}}`` by ``variables["job.parameters.X"]``. Replaced text is
    substituted again (a variable's default may name another variable). KeyError for a
    reference ``variables`` lacks. Non-string scalars are returned as they are."""
    if isinstance(value, list):
        return [substitute(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, variables) for k, v in value.items()}
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise KeyError(f"{match.group(0)} in {value!r}: no value for {name!r}")
        return str(variables[name])

    for _ in range(10):
        new = _REFERENCE.sub(replace, value)
        if new == value:
            return new
        value = new
    raise ValueError(f"references do not resolve (a cycle?): {value!r}")


# --------------------------------------------------------------------------------------------
# Validation against databricks.bundles.jobs


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def strict_problems(tp: Any, value: Any, where: str) -> list[str]:
    """Where ``value`` (loaded YAML) departs from type ``tp`` of the databricks-bundles
    models: unknown keys (with the closest known one), missing required fields and values
    not of the declared type. A whole ``${...}`` string is accepted anywhere."""
    if tp is Any:
        return []
    if isinstance(value, str) and _WHOLE_REFERENCE.fullmatch(value):
        return []
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if typing.get_origin(a) is not Variable]
        if value is None:
            return [] if type(None) in args else [f"{where}: null where a value is needed"]
        args = [a for a in args if a is not type(None)]
        results = [strict_problems(a, value, where) for a in args]
        return [] if any(not r for r in results) else results[0]
    if origin is list:
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {_type_name(value)}"]
        (item,) = typing.get_args(tp)
        return [p for i, v in enumerate(value) for p in strict_problems(item, v, f"{where}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping, got {_type_name(value)}"]
        _, item = typing.get_args(tp)
        return [p for k, v in value.items() for p in strict_problems(item, v, f"{where}.{k}")]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping ({tp.__name__}), got {_type_name(value)}"]
        fields = {f.name: f for f in dataclasses.fields(tp)}
        problems = []
        for key in value:
            if key not in fields:
                close = difflib.get_close_matches(str(key), fields, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{where}: unknown key {key!r} for {tp.__name__}{hint}")
        for name, f in fields.items():
            if name in value:
                problems += strict_problems(_hints(tp)[name], value[name], f"{where}.{name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{where}: {tp.__name__} needs {name!r}")
        return problems
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [m.value for m in tp]
        return [] if value in allowed else [f"{where}: {value!r} is not one of {allowed}"]
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is str:
        ok = isinstance(value, str)
    else:
        return [f"{where}: no check for type {tp!r}"]
    return [] if ok else [f"{where}: expected {tp.__name__}, got {_type_name(value)} {value!r}"]


def _task_types() -> list[str]:
    from databricks.bundles.jobs import Task

    return [f.name for f in dataclasses.fields(Task) if f.name.endswith("_task")]


def task_graph_problems(job: dict[str, Any], where: str) -> list[str]:
    """Task keys unique; depends_on and job_cluster_key name a task / job cluster of the job,
    without cycles; each job cluster used; each task of exactly one type; job parameters
    unique, each ``{{job.parameters.X}}`` of the tasks declared and each declared one used."""
    problems = []
    tasks = [t for t in job.get("tasks", []) if isinstance(t, dict)]
    keys = [t.get("task_key") for t in tasks]
    for key in {k for k in keys if keys.count(k) > 1}:
        problems.append(f"{where}: task key {key!r} used twice")
    clusters = [c.get("job_cluster_key") for c in job.get("job_clusters", [])]
    used_clusters = set()
    for task in tasks:
        name = f"{where}.tasks[{task.get('task_key')}]"
        for dep in task.get("depends_on", []):
            dep_key = dep.get("task_key") if isinstance(dep, dict) else dep
            if dep_key not in keys:
                problems.append(f"{name}: depends on unknown task {dep_key!r}")
            elif dep_key == task.get("task_key"):
                problems.append(f"{name}: depends on itself")
        cluster = task.get("job_cluster_key")
        if cluster is not None:
            used_clusters.add(cluster)
            if cluster not in clusters:
                problems.append(f"{name}: job_cluster_key {cluster!r} is not a job cluster "
                                f"of the job ({clusters})")
        kinds = [k for k in _task_types() if k in task]
        if len(kinds) != 1:
            problems.append(f"{name}: needs exactly one task type, has {kinds or 'none'}")
        wheel = task.get("python_wheel_task") or {}
        if wheel.get("parameters") and wheel.get("named_parameters"):
            problems.append(f"{name}: parameters and named_parameters are both set")
    for cluster in clusters:
        if cluster not in used_clusters:
            problems.append(f"{where}: job cluster {cluster!r} is used by no task")
    problems += _cycle_problems(tasks, where)
    declared = [p.get("name") for p in job.get("parameters", []) if isinstance(p, dict)]
    for name in {n for n in declared if declared.count(n) > 1}:
        problems.append(f"{where}: job parameter {name!r} declared twice")
    used = set(_JOB_PARAMETER.findall(yaml.safe_dump(job.get("tasks", []))))
    for name in sorted(used - set(declared)):
        problems.append(f"{where}: {{{{job.parameters.{name}}}}} is not a job parameter "
                        f"(declared: {declared})")
    for name in sorted(set(declared) - used):
        problems.append(f"{where}: job parameter {name!r} is used by no task")
    return problems


def _cycle_problems(tasks: list[dict[str, Any]], where: str) -> list[str]:
    deps = {t.get("task_key"): [d.get("task_key") for d in t.get("depends_on", [])
                                if isinstance(d, dict)] for t in tasks}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(key: str) -> bool:
        if state.get(key) == 1:
            return True
        if state.get(key) == 2 or key not in deps:
            return False
        state[key] = 1
        cyclic = any(visit(d) for d in deps[key])
        state[key] = 2
        return cyclic

    return [f"{where}: depends_on has a cycle through {key!r}"
            for key in deps if key not in state and visit(key)]


def job_problems(job: dict[str, Any], where: str = "job") -> list[str]:
    """Everything wrong with a job resource (a mapping as in resources/*.yml); [] when valid."""
    problems = []
    try:
        Job.from_dict(copy.deepcopy(job))
    except (ValueError, TypeError) as exc:
        problems.append(f"{where}: databricks.bundles.jobs.Job rejects it: {exc}")
    problems += strict_problems(Job, job, where)
    problems += task_graph_problems(job, where)
    return problems


# --------------------------------------------------------------------------------------------
# Helpers of the tests


def _task(job: dict[str, Any], task_key: str) -> dict[str, Any]:
    return next(t for t in job["tasks"] if t["task_key"] == task_key)


def _overrides(argv: list[str]) -> dict[str, str]:
    """The ``--set KEY=VALUE`` pairs of an argv (last one wins)."""
    pairs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--set"]
    pairs += [a.split("=", 1)[1] for a in argv if a.startswith("--set=")]
    return dict(p.split("=", 1) for p in pairs)


def _resolved_argv(task: BundleTask) -> list[str]:
    argv = substitute(task.parameters, reference_values(task.job_key))
    return [a for a in argv if a != DRY_RUN]


def _cluster_of(job: dict[str, Any], task_key: str) -> dict[str, Any]:
    key = _task(job, task_key)["job_cluster_key"]
    return next(c["new_cluster"] for c in job["job_clusters"] if c["job_cluster_key"] == key)


def _all_strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [str(k), *_all_strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in _all_strings(v)]
    return [value] if isinstance(value, str) else []


# --------------------------------------------------------------------------------------------
# The bundle as a whole


def test_bundle_root() -> None:
    root = _read_yaml(BUNDLE_FILE)
    assert set(root) <= TOP_LEVEL_KEYS, set(root) - TOP_LEVEL_KEYS
    assert root["bundle"] == {"name": BUNDLE_NAME}
    assert root["include"] == ["resources/*.yml"]
    assert included_files() == sorted((ROOT / "resources").glob("*.yml"))
    assert included_files(), "no resource file"

    artifacts = root["artifacts"]
    assert len(artifacts) == 1
    (artifact,) = artifacts.values()
    assert set(artifact) <= ARTIFACT_KEYS
    assert artifact["type"] == "whl"
    assert artifact["build"].split() == ["python", "-m", "build", "--wheel"]
    assert (ROOT / artifact["path"] / "pyproject.toml").is_file()

    variables = root["variables"]
    for name, spec in variables.items():
        assert isinstance(spec, dict) and set(spec) <= VARIABLE_KEYS, name
        assert spec.get("description") and "default" in spec, name
    assert {"catalog", "schema", "volume"} <= set(variables)
    assert variables["volume"]["default"] == "/Volumes/${var.catalog}/${var.schema}/clinlinker"

    targets = root["targets"]
    assert set(targets) == {"dev", "prod"}
    for name, target in targets.items():
        assert set(target) <= TARGET_KEYS, (name, set(target) - TARGET_KEYS)
        assert target["mode"] in TARGET_MODES
    assert targets["dev"]["mode"] == "development" and targets["dev"]["default"] is True
    assert targets["prod"]["mode"] == "production" and not targets["prod"].get("default")
    # production mode without run_as refuses a target whose root_path is not set
    assert targets["prod"]["workspace"]["root_path"]


def test_resource_files_declare_jobs_only() -> None:
    for path in included_files():
        data = _read_yaml(path)
        assert set(data) == {"resources"}, path
        assert set(data["resources"]) == {"jobs"}, path
    assert set(bundle_jobs()) == {"nightly_link", "nightly_link_cpu", "build_index",
                                  "train_biencoder"}


@pytest.mark.parametrize("job_key", sorted(_load_bundle()["resources"]["jobs"]))
def test_job_matches_databricks_definitions(job_key: str) -> None:
    assert job_problems(bundle_jobs()[job_key], job_key) == []


def test_every_variable_is_declared_and_used() -> None:
    root = _read_yaml(BUNDLE_FILE)
    declared = set(root["variables"])
    texts = [BUNDLE_FILE.read_text(encoding="utf-8")]
    texts += [p.read_text(encoding="utf-8") for p in included_files()]
    used = {name for text in texts for name in _VAR_REFERENCE.findall(text)}
    assert used - declared == set(), "used but not declared in databricks.yml"
    # a variable only its own default names is not used
    defaults = "\n".join(str(v.get("default", "")) for v in root["variables"].values())
    used_outside = {name for text in texts[1:] for name in _VAR_REFERENCE.findall(text)}
    used_outside |= set(_VAR_REFERENCE.findall(defaults))
    assert declared - used_outside == set(), "declared but not used"


def test_other_references_are_known() -> None:
    for text in [s for job in bundle_jobs().values() for s in _all_strings(job)]:
        for match in _REFERENCE.finditer(text):
            if match.group(1):
                name = match.group(1)
                assert name.startswith("var.") or name in BUNDLE_REFERENCES, text
            else:
                assert match.group(2).startswith("job.parameters."), text


def test_references_resolve() -> None:
    for job_key, job in bundle_jobs().items():
        resolved = substitute(job, reference_values(job_key))
        leftover = [s for s in _all_strings(resolved) if _REFERENCE.search(s)]
        assert leftover == [], job_key
    assert reference_values()["var.volume"] == "/Volumes/clinical/linking/clinlinker"


def test_substitute() -> None:
    values = {"var.a": "x", "var.b": "${var.a}/y", "workspace.file_path": "/w",
              "job.parameters.k": "5"}
    assert substitute("${var.b}/z", values) == "x/y/z"
    assert substitute(["${workspace.file_path}/c", "k={{job.parameters.k}}", 3], values) == [
        "/w/c", "k=5", 3]
    assert substitute({"p": "{{ job.parameters.k }}"}, values) == {"p": "5"}
    with pytest.raises(KeyError, match="var.missing"):
        substitute("${var.missing}", values)


# --------------------------------------------------------------------------------------------
# The wheel tasks


def test_wheel_tasks_run_the_project_entry_point() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    scripts = project["scripts"]
    assert ENTRY_POINT in scripts
    assert scripts[ENTRY_POINT].startswith(f"{PACKAGE}.")
    # a wheel task finds the entry point in the metadata of the distribution it names
    assert re.sub(r"[-_.]+", "-", PACKAGE) == re.sub(r"[-_.]+", "-", project["name"])
    artifact_dir = ROOT / next(iter(_read_yaml(BUNDLE_FILE)["artifacts"].values()))["path"]
    tasks = bundle_tasks()
    assert tasks
    for task in tasks:
        assert (task.package_name, task.entry_point) == (PACKAGE, ENTRY_POINT), task
    for path in included_files():
        for job_key, job in _read_yaml(path)["resources"]["jobs"].items():
            for t in job["tasks"]:
                wheels = [lib["whl"] for lib in t.get("libraries", []) if "whl" in lib]
                assert len(wheels) == 1, (job_key, t["task_key"])
                # relative to the file that declares it: the artifact's dist/ folder
                wheel = (path.parent / wheels[0]).resolve()
                assert wheel.parent == (artifact_dir / "dist").resolve()
                assert wheel.name == "*.whl"


def test_task_argv_parses_as_a_clinlinker_command(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions
                    if isinstance(a, argparse._SubParsersAction)).choices
    for task in bundle_tasks():
        argv = _resolved_argv(task)
        assert argv and argv[0] in commands, (task.job_key, task.task_key, argv[:1])
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{task.job_key}.{task.task_key}: clinlinker rejects its argv: "
                        f"{capsys.readouterr().err}")
        assert args.command == argv[0]
        config = Path(args.config)
        assert config.is_file() and config.parent == ROOT / "conf", config


def test_set_overrides_name_real_config_keys() -> None:
    from clinlinker_spark.config import apply_overrides, from_dict

    seen = set()
    for task in bundle_tasks():
        args = build_parser().parse_args(_resolved_argv(task))
        seen.add(args.command)
        module, name = COMMAND_CONFIGS[args.command].split(":")
        cls = getattr(__import__(module, fromlist=[name]), name)
        data = apply_overrides(_read_yaml(Path(args.config)), args.set)
        from_dict(cls, data)  # ConfigError on an unknown key or a wrong type
    assert seen == set(COMMAND_CONFIGS)


def test_link_job_names_tables_and_reads_artifacts_from_the_volume() -> None:
    values = reference_values("nightly_link")
    volume, job = values["var.volume"], bundle_jobs()["nightly_link"]
    link = _overrides(substitute(_task(job, "link")["python_wheel_task"]["parameters"], values))
    variables = _overrides(substitute(
        _task(job, "variables")["python_wheel_task"]["parameters"], values))
    for path_key, table_key in (("input.path", "input.table"), ("output.path", "output.table"),
                                ("output.form_cache_path", "output.form_cache_table")):
        assert link[path_key] == "", path_key  # a config names a path or a table, never both
        assert _TABLE_NAME.fullmatch(link[table_key]), (table_key, link[table_key])
    assert link["output.table"] == "clinical.linking.code_assignments"
    for key, sub in (("encoder.path", "models/bi-encoder"), ("index.path", "indexes/terminology"),
                     ("reranker.path", "models/cross-encoder"), ("ranker.path", "models/ranker")):
        assert link[key] == f"{volume}/{sub}", key
    # the variables task reads what the link task wrote, with the same index
    assert variables["assignments.path"] == "" and variables["output.path"] == ""
    assert variables["assignments.table"] == link["output.table"]
    assert _TABLE_NAME.fullmatch(variables["output.table"])
    assert variables["index_path"] == link["index.path"]
    assert _task(job, "variables")["depends_on"] == [{"task_key": "link"}]


def test_one_nightly_schedule_and_the_same_tasks_on_gpu_and_cpu() -> None:
    jobs = bundle_jobs()
    gpu, cpu = jobs["nightly_link"], jobs["nightly_link_cpu"]
    assert gpu["tasks"] == cpu["tasks"] and gpu["parameters"] == cpu["parameters"]
    for job in (gpu, cpu):
        fields = job["schedule"]["quartz_cron_expression"].split()
        assert len(fields) in (6, 7)
        assert job["schedule"]["timezone_id"] in zoneinfo.available_timezones()
    assert gpu["schedule"]["pause_status"] == "UNPAUSED"
    assert cpu["schedule"]["pause_status"] == "PAUSED"
    scheduled = [k for k, j in jobs.items()
                 if "schedule" in j and j["schedule"].get("pause_status") != "PAUSED"]
    assert scheduled == ["nightly_link"]
    cpu_cluster = substitute(_cluster_of(cpu, "link"), reference_values())
    assert "gpu" not in cpu_cluster["spark_version"]
    assert "spark.task.resource.gpu.amount" not in cpu_cluster.get("spark_conf", {})


@pytest.mark.parametrize("job_key,task_key", [("nightly_link", "link"),
                                              ("build_index", "build_index"),
                                              ("train_biencoder", "train_biencoder")])
def test_gpu_clusters(job_key: str, task_key: str) -> None:
    job = bundle_jobs()[job_key]
    cluster = substitute(_cluster_of(job, task_key), reference_values(job_key))
    assert "-gpu-ml-" in cluster["spark_version"]
    assert cluster["node_type_id"] == reference_values()["var.gpu_node_type"]
    if cluster["num_workers"] in (0, "0"):  # single node: tasks run on the driver
        assert cluster["spark_conf"]["spark.databricks.cluster.profile"] == "singleNode"
        return
    assert cluster["spark_conf"]["spark.task.resource.gpu.amount"] == "1"
    assert cluster["spark_conf"]["spark.executor.resource.gpu.amount"] == "1"


def test_training_uses_one_process_per_gpu_worker() -> None:
    task = next(t for t in bundle_tasks() if t.job_key == "train_biencoder")
    args = build_parser().parse_args(_resolved_argv(task))
    assert args.distributed and args.no_local_mode and args.use_gpu
    assert args.spark_master == ""
    cluster = substitute(_cluster_of(bundle_jobs()["train_biencoder"], task.task_key),
                         reference_values())
    assert args.num_processes == int(cluster["num_workers"]) >= 1


# --------------------------------------------------------------------------------------------
# The validator rejects what is wrong


def _first_wheel_task(job: dict[str, Any]) -> dict[str, Any]:
    return next(t for t in job["tasks"] if "python_wheel_task" in t)


def _rename(d: dict[str, Any], old: str, new: str) -> None:
    d[new] = d.pop(old)


MUTATIONS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "misspelled task type": (
        lambda j: _rename(_first_wheel_task(j), "python_wheel_task", "python_whl_task"),
        "unknown key 'python_whl_task' for Task (did you mean 'python_wheel_task'?)"),
    "misspelled cluster key": (
        lambda j: _rename(j["job_clusters"][0]["new_cluster"], "node_type_id", "node_type"),
        "unknown key 'node_type' for ClusterSpec (did you mean 'node_type_id'?)"),
    "misspelled job key": (
        lambda j: _rename(j, "job_clusters", "job_cluster"),
        "unknown key 'job_cluster' for Job"),
    "depends_on an unknown task": (
        lambda j: j["tasks"][-1].update(depends_on=[{"task_key": "linking"}]),
        "depends on unknown task 'linking'"),
    "depends_on cycle": (
        lambda j: j["tasks"][0].update(depends_on=[{"task_key": j["tasks"][-1]["task_key"]}]),
        "cycle"),
    "unknown job cluster": (
        lambda j: j["tasks"][0].update(job_cluster_key="gpu"),
        "job_cluster_key 'gpu' is not a job cluster"),
    "two task types": (
        lambda j: j["tasks"][0].update(notebook_task={"notebook_path": "x"}),
        "needs exactly one task type"),
    "task without a key": (
        lambda j: j["tasks"][0].pop("task_key"),
        "Task needs 'task_key'"),
    "a number where a string belongs": (
        lambda j: j["job_clusters"][0]["new_cluster"].update(
            spark_conf={"spark.task.resource.gpu.amount": 1}),
        "expected str, got int 1"),
    "text where a number belongs": (
        lambda j: j["job_clusters"][0]["new_cluster"].update(num_workers="two"),
        "expected int, got str 'two'"),
    "argv as one string": (
        lambda j: _first_wheel_task(j)["python_wheel_task"].update(parameters="link --x y"),
        "expected a list, got str"),
    "unknown enum value": (
        lambda j: j["job_clusters"][0]["new_cluster"].update(data_security_mode="SINGLE"),
        "'SINGLE' is not one of"),
    "undeclared job parameter": (
        lambda j: _first_wheel_task(j)["python_wheel_task"]["parameters"].append(
            "linking.top_n={{job.parameters.top_n}}"),
        "{{job.parameters.top_n}} is not a job parameter"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
@pytest.mark.parametrize("job_key", ["nightly_link", "train_biencoder"])
def test_validator_rejects_a_broken_job(job_key: str, mutation: str) -> None:
    job = bundle_jobs()[job_key]
    mutate, expected = MUTATIONS[mutation]
    mutate(job)
    problems = job_problems(job, job_key)
    assert any(expected in p for p in problems), problems


def test_databricks_bundles_checks_keys_but_converts_scalars() -> None:
    """What Job.from_dict rejects by itself, and what only the strict walk catches."""
    job = bundle_jobs()["nightly_link"]
    _rename(_task(job, "link"), "python_wheel_task", "python_whl_task")
    with pytest.raises(ValueError, match="Unexpected field 'python_whl_task'"):
        Job.from_dict(job)

    job = bundle_jobs()["nightly_link"]
    cluster = job["job_clusters"][0]["new_cluster"]
    cluster["spark_version"] = 17.3
    cluster["spark_conf"] = {"spark.task.resource.gpu.amount": 1}
    built = Job.from_dict(copy.deepcopy(job)).job_clusters[0].new_cluster
    assert built.spark_version == "17.3" and built.spark_conf == {
        "spark.task.resource.gpu.amount": "1"}
    problems = strict_problems(Job, job, "job")
    assert any("spark_version: expected str, got float" in p for p in problems), problems
    assert any("gpu.amount: expected str, got int" in p for p in problems), problems


# --------------------------------------------------------------------------------------------
# Every task of the bundle, dry-run (and the nightly job run) against local catalog tables

# the tiny models, sample index and a ranker trained with them (tests/test_spark_job.py)
from test_spark_job import (  # noqa: E402,F401 - fixtures
    reranked_ranker, sample_index, sample_terminology,
)

from clinlinker_spark.config import IndexConfig  # noqa: E402


@pytest.fixture(scope="module")
def volume(tmp_path_factory, tiny_encoder_dir, tiny_cross_encoder_dir, reranked_ranker,  # noqa: F811
           sample_terminology) -> Path:  # noqa: F811
    """A local stand-in for the artifacts volume: the models and the index where the bundle
    names them, the training data, and a terminology table for the index job."""
    import shutil

    from clinlinker_spark.samples import sample_path

    from clinlinker_spark.config import load_config
    from clinlinker_spark.encoder import BiEncoder
    from clinlinker_spark.index import build_index

    root = tmp_path_factory.mktemp("volume")
    # the index of the link job: built with the encoder settings of conf/databricks.yaml
    encoder = load_config(str(ROOT / "conf" / "databricks.yaml"), [
        f"encoder.path={tiny_encoder_dir}", "encoder.device=cpu"]).encoder
    build_index(sample_terminology, BiEncoder.from_config(encoder), IndexConfig(),
                root / "indexes" / "terminology", name="sample")
    for rel, target in {"models/bi-encoder": tiny_encoder_dir,
                        "models/multilingual-e5-small": tiny_encoder_dir,
                        "models/cross-encoder": tiny_cross_encoder_dir,
                        "models/ranker": reranked_ranker}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(target, target_is_directory=True)
    (root / "data" / "codiesp").mkdir(parents=True)
    shutil.copy(sample_path("cie10_es.csv"), root / "data" / "cie10_es.csv")
    shutil.copy(sample_path("codiesp_train_sample.tsv"), root / "data" / "codiesp" / "trainX.tsv")
    (root / "terminology").mkdir()
    sample_terminology[["code", "term"]].drop_duplicates().to_parquet(
        root / "terminology" / "terms.parquet")
    return root


@pytest.fixture()
def restored_session_conf(spark):
    """The jobs apply their SQL settings to the shared session: put them back afterwards."""
    before = dict(spark.conf.getAll)
    yield
    after = dict(spark.conf.getAll)
    for key in after.keys() - before.keys():
        if spark.conf.isModifiable(key):
            spark.conf.unset(key)
    for key, value in before.items():
        if after.get(key) != value and spark.conf.isModifiable(key):
            spark.conf.set(key, value)


def run_task(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``clinlinker <argv>`` in this process (the session already running is the job's, as
    on a Databricks cluster): its exit status and what it printed."""
    from clinlinker_spark.cli import main

    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse: a flag clinlinker does not have
        rc = int(exc.code or 1)
    return rc, capsys.readouterr().out


def local_argv(task: BundleTask, volume: Path, schema: str, **job_parameters: str) -> list[str]:
    """The task's argv with the bundle's references resolved to the local volume and
    catalog schema (spark_catalog.<schema>), job parameters at their defaults unless given."""
    values = reference_values(task.job_key, variables={"catalog": "spark_catalog",
                                                       "schema": schema,
                                                       "volume": str(volume)})
    values.update({f"job.parameters.{k}": v for k, v in job_parameters.items()})
    return substitute(task.parameters, values)


def write_mentions_table(spark, name: str) -> int:
    """The package's CodiEsp dev sample as the NER job's mentions table: the column names
    conf/databricks.yaml maps (mention_text, patient_key)."""
    from clinlinker_spark.corpora import read_gold
    from clinlinker_spark.samples import sample_path

    gold = read_gold(sample_path("codiesp_dev_sample.tsv"), "codiesp")
    mentions = gold[["mention_id", "doc_id", "start", "end", "text", "label"]].rename(
        columns={"text": "mention_text"}).assign(patient_key=gold["doc_id"])
    spark.createDataFrame(mentions).write.format("delta").saveAsTable(name)
    return len(mentions)


@pytest.mark.spark
def test_every_task_dry_runs_and_the_nightly_job_runs_on_local_tables(
    delta_spark, catalog_schema, volume, restored_session_conf, capsys,
):
    import json

    spark = delta_spark
    tasks = {(t.job_key, t.task_key): t for t in bundle_tasks()}
    prefix = f"spark_catalog.{catalog_schema}"
    rows = write_mentions_table(spark, f"{prefix}.mentions")
    seen = set()

    def dry_run(key: tuple[str, str], **job_parameters: str) -> dict[str, Any]:
        rc, out = run_task(local_argv(tasks[key], volume, catalog_schema, **job_parameters)
                           + [DRY_RUN], capsys)
        assert rc == 0, f"{key}: dry run failed (exit {rc})"
        seen.add(key)
        return json.loads(out)

    plan = dry_run(("nightly_link", "link"))
    assert plan["input"] == {"source": f"{prefix}.mentions", "format": "table",
                             "columns": plan["input"]["columns"], "rows": rows}
    assert plan["output"]["table"] == f"{prefix}.code_assignments"
    assert (plan["output"]["action"], plan["output"]["writer"]) == ("create", "delta-spark")
    assert plan["artifacts"]["ranker"]["path"] == str(volume / "models" / "ranker")
    assert not spark.catalog.tableExists(f"{prefix}.code_assignments")  # nothing written

    # the nightly job's tasks, in their order: link writes the table the variables read
    rc, _ = run_task(local_argv(tasks[("nightly_link", "link")], volume, catalog_schema), capsys)
    assert rc == 0
    assignments = spark.read.table(f"{prefix}.code_assignments")
    assert assignments.count() == rows and "patient_key" in assignments.columns
    again = dry_run(("nightly_link_cpu", "link"))
    assert again["output"]["action"] == "merge"
    assert again["output"]["columns_added_or_widened"] == []
    variables = dry_run(("nightly_link", "variables"))
    assert variables["assignments"]["table"] == f"{prefix}.code_assignments"
    dry_run(("nightly_link_cpu", "variables"))
    rc, _ = run_task(local_argv(tasks[("nightly_link", "variables")], volume, catalog_schema),
                     capsys)
    assert rc == 0 and spark.read.table(f"{prefix}.clinical_variables").count() > 0

    # an index job writes a new index directory (job parameter index_path), never the one
    # the link job reads
    build = dry_run(("build_index", "build_index"),
                    index_path=str(volume / "indexes" / "terminology-next"))
    assert build["action"] == "create" and build["terms"] > 0
    training = dry_run(("train_biencoder", "train_biencoder"))
    assert training["distributed"] and training["terms"] > 0
    assert seen == set(tasks)


@pytest.mark.spark
@pytest.mark.parametrize("wrong", ["missing table", "unknown key", "unknown flag",
                                   "index in use"])
def test_a_wrong_task_parameter_fails_its_dry_run(
    delta_spark, catalog_schema, volume, restored_session_conf, capsys, wrong,
):
    prefix = f"spark_catalog.{catalog_schema}"
    write_mentions_table(delta_spark, f"{prefix}.mentions")
    tasks = {(t.job_key, t.task_key): t for t in bundle_tasks()}
    task = tasks[("build_index", "build_index") if wrong == "index in use"
                 else ("nightly_link", "link")]
    argv = local_argv(task, volume, catalog_schema)
    if wrong == "missing table":
        argv = [a.replace(f"{prefix}.mentions", f"{prefix}.mention") for a in argv]
    elif wrong == "unknown key":
        argv = [a.replace("linking.top_k=", "linking.topk=") for a in argv]
    elif wrong == "unknown flag":
        argv = [a.replace("--config", "--conf") for a in argv]
    rc, out = run_task(argv + [DRY_RUN], capsys)
    assert rc != 0 and not out.strip()
