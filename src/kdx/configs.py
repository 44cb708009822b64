"""Config options kdx generates instead of keeping one YAML file per option.

Most options of the ``student``, ``teacher``, ``method`` and ``hparams_search`` groups would be files
that differ only in a name: a student is its architecture, a CIFAR zoo teacher is its architecture
trained by the CRD recipe, a method's hyper-parameters are its typed ``__init__`` defaults, a search
is a table row. :func:`register` stores those options in Hydra's ConfigStore, where every
composition finds them (``kdx-train``, ``python -m kdx.train``, the compose API, an installed wheel);
``kdx/__init__.py`` calls it, so importing anything of kdx is enough. A YAML file of the same group
and name wins over a generated option (Hydra reads conf/ before the ConfigStore): an option that
carries a real recipe keeps its file.

What is generated:

- ``student/<arch>`` for every ``conf/model/<arch>.yaml``: that model, named after it, no stage names.
- ``teacher/<arch>`` for every ``conf/model/<arch>.yaml``: that model, named after it, trained by
  ``conf/teacher/_crd_recipe.yaml`` (a CIFAR zoo model, ``kdx.models.registry.create_model``) or by
  the default teacher recipe ``conf/teacher/_recipe.yaml`` with Adam (any other model) when
  ``teacher.ckpt=auto``; a Hugging Face text model built from a config (``conf/model/bert_l4_h128.yaml``...)
  reads the batch's ``teacher.*`` keys and is trained by the text recipe of
  ``conf/teacher/bert_l2_h64.yaml``: AdamW at 1e-3 with a linear decay, 10 epochs (an experiment
  config sets the recipe measured on its data, ``conf/experiment/sst2/table.yaml``).
- ``method/<name>`` for every ``@register_method`` class: its typed schema
  (``schema/method/<name>``), plus the values an experiment row tunes for that method (below).
- ``hparams_search/<name>_optuna`` for every entry of ``conf/hparams_search/_spaces.yaml``: the shared
  sweeper settings (``_optuna.yaml``), the method, its search space; and
  ``hparams_search/<name>_optuna/_holdout``, the validation hold-out that data sets whose validation
  is the test set include while a search runs (``conf/dataset/cifar*.yaml``).
- ``experiment/_tuned/<row>/<method>`` for every ``tuned: {<method>: {...}}`` block of an
  experiment row: the method's values tuned for that row, which ``method/<method>`` includes when
  the row runs that method (``experiment=crd_cifar100/<row> method=dkd`` gets the row's DKD β).

Nothing here imports torch: the console scripts' front door (:mod:`kdx.front_door`) lists these options
before the heavy imports, so method names are read from the sources of ``kdx/methods/``; so are
their hyper-parameters (:func:`method_signatures`), which the front door stores as untyped stand-ins
for the typed ``schema/method/<name>`` nodes while it checks a command line's keys.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from importlib import resources
from pathlib import Path

import yaml
from hydra.core.config_store import ConfigStore

METHODS_DIR = Path(__file__).parent / "methods"
ZOO_TARGET = "_target_: kdx.models.registry.create_model"
# the include every generated method option ends with: the values the chosen experiment row tunes
# for this method, if any (absent experiment: "none/<name>", which does not exist either)
TUNED_INCLUDE = "optional /experiment/_tuned@_here_"
GENERATED_GROUPS = ("student", "teacher", "method", "hparams_search")
# libyaml's parser when PyYAML has it: these files are read on every `import kdx`
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def conf_root() -> Path:
    return Path(str(resources.files("kdx.conf")))


def _file_options(group: str) -> set[str]:
    return {p.stem for p in (conf_root() / group).glob("*.yaml") if not p.stem.startswith("_")}


@cache
def method_names() -> tuple[str, ...]:
    """The names of kdx's registered methods, read from their ``@register_method("...")`` lines."""
    pattern = re.compile(r"""^@register_method\(\s*["'](\w+)["']\s*\)""", re.M)
    return tuple(sorted(n for p in METHODS_DIR.glob("*.py") for n in pattern.findall(p.read_text())))


def _literal(node: ast.expr | None) -> object:
    try:
        return ast.literal_eval(node) if node is not None else "???"
    except ValueError:  # a default computed in code: its key is what the front door needs
        return None


def method_signatures() -> dict[str, dict[str, object]]:
    """``{method: {hyper-parameter: default}}`` read from each registered method's ``__init__``
    signature (its own or the nearest base class's) in the sources of ``kdx/methods/``; a default
    that is not a literal reads ``None``, a required one ``???``."""
    return {name: params for name, (_, params) in _method_sources().items()}


@cache
def _method_sources() -> dict[str, tuple[str, dict[str, object]]]:
    """``{method: (its class's import path, {hyper-parameter: default})}`` from the sources."""
    classes: dict[str, ast.ClassDef] = {}
    modules: dict[str, str] = {}
    registered: dict[str, str] = {}
    for path in sorted(METHODS_DIR.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.ClassDef):
                continue
            classes[node.name] = node
            modules[node.name] = f"kdx.methods.{path.stem}.{node.name}"
            for dec in node.decorator_list:
                if (
                    isinstance(dec, ast.Call)
                    and getattr(dec.func, "id", None) == "register_method"
                    and dec.args
                    and isinstance(dec.args[0], ast.Constant)
                ):
                    registered[str(dec.args[0].value)] = node.name

    def init_of(name: str) -> ast.FunctionDef | None:
        cls = classes.get(name)
        if cls is None:
            return None
        for item in cls.body:
            if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                return item
        bases = (init_of(b.id) for b in cls.bases if isinstance(b, ast.Name))
        return next((b for b in bases if b is not None), None)

    out: dict[str, tuple[str, dict[str, object]]] = {}
    for method, cls_name in registered.items():
        init = init_of(cls_name)
        params: dict[str, object] = {}
        if init is not None:
            args = init.args
            positional = [*args.posonlyargs, *args.args][1:]  # without self
            defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
            for arg, default in zip(positional, defaults, strict=True):
                params[arg.arg] = _literal(default)
            for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
                params[arg.arg] = _literal(default)
        out[method] = (modules[cls_name], params)
    return out


def register_signature_schemas() -> None:
    """Untyped ``schema/method/<name>`` nodes (keys and defaults only) from :func:`method_signatures`,
    so that a command line composes without torch; importing :mod:`kdx.methods` replaces them with
    the typed schemas (and a typed schema already stored is kept)."""
    cs = ConfigStore.instance()
    typed = cs.repo.get("schema", {}).get("method", {})  # kdx.methods imported: never replace those
    for name, (target, params) in _method_sources().items():
        if f"{name}.yaml" not in typed:
            cs.store(group="schema/method", name=name, node={"_target_": target, **params})


@cache
def model_names() -> tuple[str, ...]:
    return tuple(sorted(_file_options("model")))


@cache
def zoo_model_names() -> tuple[str, ...]:
    root = conf_root() / "model"
    return tuple(n for n in model_names() if ZOO_TARGET in (root / f"{n}.yaml").read_text())


@cache
def text_model_names() -> tuple[str, ...]:
    """Randomly initialised Hugging Face models (``defaults: [hf]`` with a ``config``)."""
    root = conf_root() / "model"
    names = []
    for name in model_names():
        spec = _load(root / f"{name}.yaml") or {}
        if "hf" in (spec.get("defaults") or []) and spec.get("config"):
            names.append(name)
    return tuple(names)


# the teacher recipe of a generated text teacher (as conf/teacher/bert_l2_h64.yaml)
_TEXT_TEACHER = {
    "model": {"input_prefix": "teacher."},
    "train": {"epochs": 10, "optim": {"optimizer": {"lr": 1.0e-3}}},
}


def _load(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_LOADER)


@cache
def _search_table() -> dict:
    return _load(conf_root() / "hparams_search" / "_spaces.yaml")


def search_spaces() -> dict[str, dict]:
    """``conf/hparams_search/_spaces.yaml``: the Optuna search space of each method."""
    return {name: dict(entry) for name, entry in _search_table()["spaces"].items()}


def search_holdout() -> float:
    """The share of the training set a search holds out on data sets whose validation is the test set."""
    return float(_search_table()["val_fraction"])


@cache
def tuned_rows() -> dict[str, dict[str, dict]]:
    """``{row: {method: values}}`` from the ``tuned:`` blocks of kdx's experiment rows."""
    root = conf_root() / "experiment"
    rows = {}
    for path in sorted(root.rglob("*.yaml")):
        if "\ntuned:" in path.read_text():
            rows[path.relative_to(root).with_suffix("").as_posix()] = _load(path)["tuned"]
    return rows


def _generated(group: str) -> list[str]:
    names = {
        "student": model_names(),
        "teacher": model_names(),
        "method": method_names(),
        "hparams_search": tuple(f"{m}_optuna" for m in search_spaces()),
    }.get(group, ())
    return sorted(set(names) - _file_options(group))


def generated_options(group: str) -> list[str]:
    """The options of ``group`` that :func:`register` stores (a file of the same name wins)."""
    return _generated(group) if group in GENERATED_GROUPS else []


def method_node(name: str) -> dict:
    return {
        "defaults": [
            f"/schema/method/{name}@_here_",
            "_self_",
            {TUNED_INCLUDE: "${oc.select:experiment,none}/" + name},
        ]
    }


def register() -> None:
    store = ConfigStore.instance().store
    for arch in generated_options("student"):
        store(
            group="student",
            name=arch,
            node={"defaults": [{"/model@model": arch}, "_self_"], "name": arch, "stage_names": None},
        )
    zoo, text = set(zoo_model_names()), set(text_model_names())
    for arch in generated_options("teacher"):
        optim = "adamw_linear" if arch in text else "adam"
        recipe = ["_crd_recipe"] if arch in zoo else ["_recipe", {"/optim@train.optim": optim}]
        store(
            group="teacher",
            name=arch,
            node={
                "defaults": [*recipe, {"/model@model": arch}, "_self_"],
                "name": arch,
                **(_TEXT_TEACHER if arch in text else {}),
            },
        )
    for name in generated_options("method"):
        store(group="method", name=name, node=method_node(name))
    holdout = {"datamodule": {"val_fraction": search_holdout()}}
    for method, params in search_spaces().items():
        search = f"{method}_optuna"
        store(group=f"hparams_search/{search}", name="_holdout", node=holdout)
        if search not in generated_options("hparams_search"):
            continue
        node = {
            "defaults": ["/hparams_search/_optuna", {"override /method": method}],
            "hydra": {"sweeper": {"study_name": "${task_name}-" + method, "params": params}},
        }
        store(group="hparams_search", name=search, node=node, package="_global_")
    for row, methods in tuned_rows().items():
        for method, values in methods.items():
            store(group=f"experiment/_tuned/{row}", name=method, node=dict(values))
