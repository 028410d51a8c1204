"""The fields of a training config: loading a config file, listing its fields and values, a
"did you mean" for an unknown field, and the README's table of every field with its default and
meaning, generated from the schema's docstrings (`training.default_config`'s "Fields" and
`ModelConfig`'s "Attributes").

    python -m experiments.config_fields            # print the table (markdown)
    python -m experiments.config_fields --readme   # rewrite the README's marked section

Shared by `experiments.train` (`parse_flags`, `format_config`) and `experiments.sweep`
(`load_config_module`, `unknown_field`).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import re
import sys
from pathlib import Path

import ml_collections
from absl import app, flags

from bmojo_jax import ModelConfig
from bmojo_jax import training

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- config-fields: begin -->", "<!-- config-fields: end -->"


# --------------------------------------------------------------------------------------------------
# Config files and their fields
# --------------------------------------------------------------------------------------------------


def load_config_module(path: str):
    """The module of a config file (its `get_config`).

    Raises:
      ValueError: no such file, or no get_config in it.
    """
    if not Path(path).is_file():
        raise ValueError(f"--config={path}: no such file.")
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config={path}: defines no get_config(arg).")
    return module


def fields(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
    """{dotted field: value} of every leaf of `config`, in order (an empty ConfigDict, such as a
    corpus config's `data.task`, is a leaf {})."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict) and len(value):
            out.update(fields(value, f"{name}."))
        else:
            out[name] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
    return out


def format_config(config: ml_collections.ConfigDict) -> str:
    """One line "field = value" (Python repr) per leaf of `config`."""
    return "\n".join(f"{name} = {value!r}" for name, value in fields(config).items())


def unknown_field(config: ml_collections.ConfigDict, field: str) -> str | None:
    """None when the dotted `field` names a field (a leaf or a group) of `config`; otherwise
    "unknown config field 'F'; did you mean A, B? (fields of G: ...)": the closest names
    (difflib, over every field) and the fields of the deepest group that exists."""
    node, parent = config, ""
    for key in field.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            names = list(fields(config)) + _groups(config)
            close = difflib.get_close_matches(field, names, n=3, cutoff=0.5)
            if not isinstance(node, ml_collections.ConfigDict):
                here = f"{parent} is a value, not a group"
            else:
                here = (f"the fields of {parent}: " if parent else "top-level fields: ") + \
                    ", ".join(node)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            return f"unknown config field {field!r}; {hint}({here}; every field: --print_config)"
        node, parent = node[key], f"{parent}.{key}" if parent else key
    return None


def _groups(config, prefix=""):
    return [name for key, value in config.items()
            if isinstance(value, ml_collections.ConfigDict)
            for name in [f"{prefix}{key}", *_groups(value, f"{prefix}{key}.")]]


def load_config(spec: str) -> ml_collections.ConfigDict:
    """The config of a `--config` value "PATH[:ARG]" (`get_config(ARG)`, or `get_config()`).

    Raises:
      ValueError: see `load_config_module`.
    """
    path, sep, arg = spec.partition(":")
    module = load_config_module(path)
    return module.get_config(arg) if sep else module.get_config()


def parse_flags(argv: list[str]) -> list[str]:
    """An absl `app.run` flags parser for a program with a `--config` file flag
    (`ml_collections.config_flags`): before absl parses, every `--config.FIELD` override is
    checked against the config file's fields, and an unknown one ends the program with one line
    (`unknown_field`) and exit status 1, not a traceback. A config file that does not load is left
    to absl's own error."""
    spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
    if spec is None and "--config" in argv[1:-1]:
        spec = argv[argv.index("--config") + 1]
    overrides = [a.split("=", 1)[0].split(".", 1)[1] for a in argv[1:]
                 if a.startswith(("--config.", "--noconfig."))]
    if spec is not None and overrides:
        try:
            config = load_config(spec)
        except Exception:  # a config file that does not load: absl's error reports it
            config = None
        for field in overrides if config is not None else ():
            message = unknown_field(config, field)
            if message:
                sys.exit(f"error: --config.{field}: {message}")
    return app.parse_flags_with_usage(argv)


# --------------------------------------------------------------------------------------------------
# The README table, from the schema's docstrings
# --------------------------------------------------------------------------------------------------


def _doc_entries(doc: str, heading: str) -> list[tuple[list[str], str]]:
    """The entries "  NAME[, NAME]: text" (continued on deeper-indented lines) of the section of
    `doc` that starts with a line beginning with `heading`, as ([names], text)."""
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading)) + 1
    entries = []
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break  # the next section
        entry = re.match(r"^  ([\w.]+(?:, [\w.]+)*): (.*)$", line)
        if entry:
            entries.append((entry.group(1).split(", "), entry.group(2).strip()))
        elif line.strip() and entries:
            entries[-1] = (entries[-1][0], f"{entries[-1][1]} {line.strip()}")
    return entries


def field_table() -> list[tuple[list[tuple[str, object]], str]]:
    """The rows of the README table: ([(field, default)], meaning), one row per docstring entry of
    `training.default_config` ("model" expanded into one row per `ModelConfig` attribute, with
    the `ModelConfig` default; unset, a `model` field keeps the preset's value).

    Raises:
      ValueError: a schema field that no docstring entry describes (the message names it).
    """
    schema = fields(training.default_config())
    model_defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    rows, covered = [], set()
    for names, text in _doc_entries(inspect.getdoc(training.default_config), "Fields"):
        if names == ["model"]:
            for (attribute,), meaning in _doc_entries(inspect.getdoc(ModelConfig), "Attributes"):
                rows.append(([(f"model.{attribute}", model_defaults[attribute])], meaning))
                covered.add(f"model.{attribute}")
            continue
        # "a: ...; b: ..." describes b too (e.g. data.seq_len; data.eval_seq_len)
        names = names + [n for n in re.findall(r"; ([\w.]+): ", text) if n in schema]
        mine = list(dict.fromkeys(f for n in names for f in schema if f not in covered and (
            f == n or f.startswith(f"{n}."))))  # in the docstring's order
        rows.append(([(f, schema[f]) for f in mine], text))
        covered.update(mine)
    missing = [f for f in schema if f not in covered]
    if missing:
        raise ValueError(f"config fields without a description in the docstrings of "
                         f"training.default_config (Fields) or ModelConfig (Attributes): "
                         f"{', '.join(missing)}.")
    return rows


def markdown_table() -> str:
    """The README table (`field_table`) in markdown."""
    lines = ["| field = default | meaning |", "|---|---|"]
    for pairs, meaning in field_table():
        cell = "<br>".join(f"`{name}` = `{value!r}`" for name, value in pairs)
        lines.append(f"| {cell} | {meaning.replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"


def readme_section() -> str:
    """The marked README section: the markers and, between them, `markdown_table()`."""
    return (f"{BEGIN}\n<!-- generated by `python -m experiments.config_fields --readme` from the "
            f"docstrings of training.default_config and ModelConfig; edit those -->\n\n"
            f"Every field of `training.default_config` with its default; a config file changes "
            f"some. The `model.*` fields are `ModelConfig`'s: unset (None) in a training config, "
            f"they keep the preset's value, and the default shown is `ModelConfig`'s.\n\n"
            f"{markdown_table()}\n{END}")


def rewrite_readme(path: Path = README) -> bool:
    """Replaces the marked section of the README at `path` with `readme_section()`; True when it
    changed.

    Raises:
      ValueError: the README has not exactly one pair of markers.
    """
    text = path.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError(f"{path}: needs exactly one {BEGIN} and one {END} line.")
    head, rest = text.split(BEGIN)
    new = head + readme_section() + rest.split(END, 1)[1]
    path.write_text(new)
    return new != text


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        if flags.FLAGS.readme:
            print(f"{README}: " + ("updated" if rewrite_readme() else "already up to date"))
        else:
            print(markdown_table(), end="")
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    flags.DEFINE_bool("readme", False, f"Rewrite the marked section of {README.name} instead of "
                      "printing the table.")
    app.run(main)
