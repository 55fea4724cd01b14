"""`alignloop template ...`: render, compare, lint and cost chat templates from the command line.

A template is named in one of four ways (first match wins):

- a file holding a Jinja chat template (e.g. ``my_template.jinja``);
- a template of the conformance corpus (``llama-3.1-instruct``, ``mistral-7b-instruct-v0.3``, ...:
  shared/conformance/chat_templates/templates/index.json, or ``$ALIGNLOOP_CHAT_CORPUS``), with the
  bos/eos its model declares;
- an alignloop chat family or alias (``llama-3``, ``mistral-nemo``, ...): that family's first corpus template;
- a zoo model (``smollm2-135m``, ...): its tokenizer's own template and tokenizer.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

import typer

from alignloop.errors import AlignloopError
from alignloop.ui import status

app = typer.Typer(help="Chat templates: render, diff, lint and token costs.", no_args_is_help=True)

MessagesOption = Annotated[Path, typer.Option("--messages", "-m", help="JSON file: a list of messages "
                                              "(or {\"messages\": [...], \"tools\": [...]}).")]
ToolsOption = Annotated[Path | None, typer.Option("--tools", help="JSON file: a list of tool schemas.")]
GenOption = Annotated[bool, typer.Option("--generation-prompt", "-g", help="Open an assistant turn at the end.")]
SMOLLM2 = "smollm2-135m"


# --------------------------------------------------------------------------------------------------
# Naming a template
# --------------------------------------------------------------------------------------------------


def corpus_dir() -> Path:
    """The chat-template conformance corpus: $ALIGNLOOP_CHAT_CORPUS, else the repository's sibling shared/."""
    env = os.environ.get("ALIGNLOOP_CHAT_CORPUS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3].parent / "shared" / "conformance" / "chat_templates"


@lru_cache(maxsize=4)
def _index(root: Path) -> dict[str, dict]:
    path = root / "templates" / "index.json"
    if not path.is_file():
        return {}
    return {entry["family"]: entry for entry in json.loads(path.read_text(encoding="utf-8"))}


def corpus_index() -> dict[str, dict]:
    """Corpus template name -> its index entry (bos_token, eos_token, ...); empty without the corpus."""
    return _index(corpus_dir())


@dataclass
class Loaded:
    """A named template: its source, the special tokens it renders with, and a tokenizer if it came with one."""

    name: str
    source: str
    bos_token: str | None = None
    eos_token: str | None = None
    tokenizer: Any = None


def _from_corpus(name: str) -> Loaded:
    entry = corpus_index()[name]
    source = (corpus_dir() / "templates" / f"{name}.jinja").read_text(encoding="utf-8")
    return Loaded(name, source, entry.get("bos_token"), entry.get("eos_token"))


def _family_template(name: str) -> str | None:
    """The first corpus template of the alignloop family (or alias) `name`."""
    from alignloop.chat.families import detect_family, get_family

    try:
        family = get_family(name)
    except KeyError:
        return None
    for template in corpus_index():
        source = (corpus_dir() / "templates" / f"{template}.jinja").read_text(encoding="utf-8")
        if detect_family(source) == family:
            return template
    return None


def load_template(spec: str) -> Loaded:
    """Resolve a template file, corpus template, chat family or zoo model name (see the module docstring)."""
    from alignloop.chat.families import detect_family
    from alignloop.models import KNOWN_MODELS

    path = Path(spec).expanduser()
    if path.is_file():
        source = path.read_text(encoding="utf-8")
        family = detect_family(source)
        return Loaded(path.name, source, family and family.bos_token, family and family.eos_token)
    if path.suffix == ".jinja":
        raise AlignloopError(f"template file not found: {spec}")
    if spec in corpus_index():
        return _from_corpus(spec)
    template = _family_template(spec)
    if template is not None:
        return _from_corpus(template)
    if spec in KNOWN_MODELS or "/" in spec or path.is_dir():
        tokenizer = _tokenizer(spec)
        source = getattr(tokenizer, "chat_template", None)
        if not isinstance(source, str):
            raise AlignloopError(f"model '{spec}' has no single chat template in its tokenizer")
        return Loaded(spec, source, tokenizer.bos_token, tokenizer.eos_token, tokenizer)
    corpus = ", ".join(list(corpus_index())[:6]) or "none: corpus not found"
    raise AlignloopError(f"'{spec}' is not a template file, a corpus template ({corpus}, ...), a chat family "
                         f"or a zoo model ({', '.join(KNOWN_MODELS)})")


def _tokenizer(name: str) -> Any:
    from alignloop.models import load_tokenizer

    with status(f"Loading the tokenizer of {name} ..."):
        return load_tokenizer(name)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AlignloopError(f"{what} file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise AlignloopError(f"{what} file {path} is not valid JSON ({exc})") from None


def _read_inputs(messages_path: Path, tools_path: Path | None) -> tuple[list[dict], list | None]:
    data = _read_json(messages_path, "--messages")
    tools = None
    if isinstance(data, dict):
        tools = data.get("tools")
        data = data.get("messages")
    if not isinstance(data, list) or not all(isinstance(m, dict) and "role" in m for m in data):
        raise AlignloopError(f"--messages {messages_path}: expected a JSON list of messages with a 'role' each")
    if tools_path is not None:
        tools = _read_json(tools_path, "--tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise AlignloopError("tools must be a JSON list of tool schemas (objects)")
    return data, tools


def _render(loaded: Loaded, messages: list[dict], tools: list | None, generation_prompt: bool) -> str:
    from alignloop.chat.normalize import normalize_messages
    from alignloop.chat.render import ChatTemplate

    chat = ChatTemplate(loaded.source, bos_token=loaded.bos_token, eos_token=loaded.eos_token)
    try:
        return chat.render(normalize_messages(messages, template=loaded.source), tools=tools,
                           add_generation_prompt=generation_prompt)
    except Exception as exc:  # the template's own complaint (alternation, system role, ...) or a Jinja error
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AlignloopError(f"template {loaded.name} cannot render these messages: {why}") from None


def _stdout():
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------


@app.command()
def render(
    model_or_file: Annotated[str, typer.Argument(help="Template file, corpus template, chat family or zoo model.")],
    messages: MessagesOption,
    tools: ToolsOption = None,
    generation_prompt: GenOption = False,
) -> None:
    """Print the rendered text of a conversation."""
    chat, tool_list = _read_inputs(messages, tools)
    typer.echo(_render(load_template(model_or_file), chat, tool_list, generation_prompt))


@app.command()
def diff(
    family_a: Annotated[str, typer.Argument(help="First template (as for `render`).")],
    family_b: Annotated[str, typer.Argument(help="Second template.")],
    messages: MessagesOption,
    tools: ToolsOption = None,
    generation_prompt: GenOption = False,
) -> None:
    """Show two templates' renders of one conversation side by side, line by line."""
    from rich.table import Table
    from rich.text import Text

    chat, tool_list = _read_inputs(messages, tools)
    a, b = load_template(family_a), load_template(family_b)
    left = _render(a, chat, tool_list, generation_prompt).split("\n")
    right = _render(b, chat, tool_list, generation_prompt).split("\n")
    table = Table(a.name, b.name, show_lines=False, expand=True)
    styles = {"equal": "dim", "replace": "yellow", "delete": "red", "insert": "green"}
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, left, right, autojunk=False).get_opcodes():
        for k in range(max(i2 - i1, j2 - j1)):
            cells = [Text(side[start + k], style=styles[op]) if start + k < end else Text("")
                     for side, start, end in ((left, i1, i2), (right, j1, j2))]
            table.add_row(*cells)
    out = _stdout()
    out.print(table)
    out.print("identical renders" if left == right else f"{a.name} and {b.name} render differently", highlight=False)


@app.command()
def lint(
    model_or_file: Annotated[str, typer.Argument(help="Template file, corpus template, chat family or zoo model.")],
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", "-t", help="Zoo model whose tokenizer to "
                                                     "check against (default: the model's own, if any).")] = None,
) -> None:
    """Report what the template drops or gets wrong; exit code 1 if any finding is an error."""
    from rich.table import Table
    from rich.text import Text

    from alignloop.chat.lint import lint_template

    loaded = load_template(model_or_file)
    tok = _tokenizer(tokenizer) if tokenizer else loaded.tokenizer
    findings = lint_template(loaded.source, bos_token=loaded.bos_token, eos_token=loaded.eos_token, tokenizer=tok)
    out = _stdout()
    if not findings:
        out.print(f"{loaded.name}: no findings", highlight=False)
        return
    colors = {"error": "bold red", "warning": "yellow", "info": "cyan"}
    table = Table("severity", "kind", "message", title=Text(f"lint: {loaded.name}"))
    for finding in findings:  # Text, not markup: messages quote strings like '[INST]'
        table.add_row(Text(finding.severity, style=colors[finding.severity]), finding.kind, Text(finding.message))
    out.print(table)
    if any(f.severity == "error" for f in findings):
        raise typer.Exit(code=1)


@app.command()
def cost(
    families: Annotated[list[str] | None, typer.Argument(help="Templates (as for `render`; default: every "
                                                            "corpus template).")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also write a bar chart (PNG) here.")] = None,
) -> None:
    """Template-overhead tokens per template: SmolLM2's tokenizer, plus Mistral's own for Mistral families."""
    from alignloop.chat.cost import MISTRAL_TOKENIZER_OF_FAMILY, cost_plot, cost_table, mistral_tokenizer, template_costs
    from alignloop.chat.families import detect_family

    names = families or list(corpus_index())
    if not names:
        raise AlignloopError(f"no templates given and no conformance corpus at {corpus_dir()}")
    loaded = [load_template(name) for name in names]
    smollm2 = _tokenizer(SMOLLM2)
    have_mistral = importlib.util.find_spec("mistral_common") is not None
    if not have_mistral:
        _stdout().print("mistral-common is not installed: Mistral templates are costed with SmolLM2's tokenizer only",
                        highlight=False)
    rows = []
    with status("Measuring template costs ..."):
        for item in loaded:
            tokenizers = [("smollm2", smollm2)]
            family = detect_family(item.source)
            if family is not None and family.name in MISTRAL_TOKENIZER_OF_FAMILY and have_mistral:
                version = MISTRAL_TOKENIZER_OF_FAMILY[family.name]
                tokenizers.append((f"mistral-common {version}", mistral_tokenizer(version)))
            for label, tok in tokenizers:
                costs = template_costs(item.source, tok, bos_token=item.bos_token, eos_token=item.eos_token)
                rows.append({"template": item.name, "tokenizer": label, **costs})
    _stdout().print(cost_table(rows))
    if plot is not None:
        _stdout().print(f"plot written to {cost_plot(rows, plot)}", highlight=False)
