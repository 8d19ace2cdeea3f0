"""Every Flower command line we show works with the installed Flower: the ones in the
Dockerfile's header, in ``compose.yaml``, in README.md and docs/*.md (code blocks and
inline code), and the ``flower-superlink`` / ``flower-supernode`` / ``flwr`` invocations
of ``scripts/deploy_local.sh`` are parsed with Flower's own argument parsers (argparse
for the two daemons, the ``flwr`` CLI's click command built by typer). A removed flag
(``flower-supernode --clientappio-api-address``), an unknown one, a bad value (a port
that is not a number) or a flag Flower marks deprecated fails the test, naming the file,
the line and Flower's message. The compose file's ports, node count and run-config are
checked against each other, against its CLI connection and against the app's run-config
keys. Nothing is built or started; no network.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import re
import shlex
import tomllib
from pathlib import Path

import click
import pytest
import yaml
from flwr.cli.app import typer_click_object
from flwr.cli.flower_config import parse_superlink_connection
from flwr.common.config import flatten_dict, parse_config_args
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE, COMPOSE = ROOT / "Dockerfile", ROOT / "compose.yaml"
CLI_CONFIG, SCRIPT = ROOT / "docker" / "config.toml", ROOT / "scripts" / "deploy_local.sh"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = ("flower-superlink", "flower-supernode", "flwr")
ARGPARSERS = {"flower-superlink": _parse_args_run_superlink,
              "flower-supernode": _parse_args_run_supernode}
# A program in command position: first word (after VAR=value words), behind a docker
# command's image, or called by its path in deploy_local.sh's bin directory.
_MENTION = re.compile(r"(?:\$FLWR_BIN_DIR/|\$\{FLWR_BIN_DIR\}/)?"
                      r"\b(flower-superlink|flower-supernode|flwr)(?=[\s\"')]|$)")
_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")", ">", ">>", "<", ";;", "|&"}


# --- Parsing a command with Flower's parsers ---------------------------------------------

def flower_error(argv: list[str]) -> str | None:
    """Why Flower refuses ``argv`` (program first), or None when it parses."""
    program, args = argv[0], argv[1:]
    if program == "flwr":
        return _click_error(args)
    parser: argparse.ArgumentParser = ARGPARSERS[program]()
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as stop:
        if stop.code not in (0, None):
            return stderr.getvalue().strip().splitlines()[-1]
    for word in args:
        action = parser._option_string_actions.get(word.split("=", 1)[0])
        if action is not None and (action.help == argparse.SUPPRESS
                                   or "deprecated" in (action.help or "").lower()):
            return f"{word.split('=', 1)[0]} is deprecated or removed in this Flower"
    return None


def _click_error(args: list[str]) -> str | None:
    command, path, words = typer_click_object, ["flwr"], list(args)
    while isinstance(command, click.Group) and words and not words[0].startswith("-"):
        sub = command.get_command(click.Context(command), words[0])
        if sub is None:
            return f"no such command: {' '.join(path)} {words[0]}"
        command, path, words = sub, path + [words.pop(0)], words
    if isinstance(command, click.Group) and not words:
        return None  # `flwr supernode`: prints the group's help
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            context = command.make_context(" ".join(path), words)
    except click.exceptions.Exit as stop:  # --help, --version
        return None if stop.exit_code == 0 else f"exit {stop.exit_code}"
    except click.ClickException as error:
        return error.format_message()
    if context.args:
        return f"unexpected arguments {context.args}"
    for param in command.params:
        if isinstance(param, click.Option) and set(param.opts) & set(words) and (
                param.hidden or "deprecated" in (param.help or "").lower()):
            return f"{param.opts[0]} is deprecated or removed in this Flower"
    return None


# --- Finding the command lines ----------------------------------------------------------

def commands_in_text(text: str) -> list[list[str]]:
    """Every Flower command in one logical shell line (comments and ``\\`` breaks
    already handled), as argv lists; ``...`` (an elision) is dropped."""
    text = re.sub(r"<[\w .-]+>", "PLACEHOLDER", text)          # <connection>, <id>
    text = re.sub(r"(?<!\S)\d?>&\d", " ", text)                 # 2>&1
    found = []
    for match in _MENTION.finditer(text):
        before = text[:match.start()].rstrip("\"'")
        called_by_path = match.group(0) != match.group(1)
        if not called_by_path and not _command_position(before):
            continue
        argv = [match.group(1)]
        lexer = shlex.shlex(text[match.end():], posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            for token in lexer:
                if token in _OPERATORS or token.startswith("#"):
                    break
                if token != "...":
                    argv.append(token)
        except ValueError as error:
            raise AssertionError(f"cannot read the shell line {text!r}: {error}") from None
        found.append(argv)
    return found


def _command_position(before: str) -> bool:
    try:
        words = shlex.split(before + " MENTION", comments=True)
    except ValueError:
        return False
    if words[-1:] != ["MENTION"]:
        return False                                            # in a shell comment
    words.pop()
    while words and re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0]):
        words.pop(0)                                            # FLWR_HOME=... flwr
    if not words or before.rstrip().endswith(("&&", "||", ";", "|", "$(", "(")):
        return True
    return words[0] == "docker"                                 # docker run IMAGE flwr


def shell_lines(lines: list[str]) -> list[tuple[int, str]]:
    """(line number, logical line): continuation lines joined, comment lines dropped."""
    out: list[tuple[int, str]] = []
    joining = False
    for number, line in lines:
        if joining:
            out[-1] = (out[-1][0], out[-1][1][:-1] + " " + line.strip())
        elif not line.lstrip().startswith("#"):
            out.append((number, line.strip()))
        else:
            continue
        joining = out[-1][1].endswith("\\")
    return out


def markdown_commands(path: Path) -> list[tuple[str, list[str]]]:
    """Commands in fenced code blocks and in inline code spans (those with an option)
    of a Markdown page."""
    found, fence, block, prose = [], None, [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        opener = re.match(r"^\s*(`{3,}|~{3,})", line)
        if fence is None and opener:
            fence, block = opener.group(1), []
        elif fence is not None and line.strip().startswith(fence):
            for start, logical in shell_lines(block):
                found += [(f"{path.relative_to(ROOT)}:{start}", argv) for argv in commands_in_text(logical)]
            fence = None
        elif fence is not None:
            block.append((number, line))
        else:
            prose.append((number, line))
    paragraph = " ".join(line for _, line in prose)
    for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", paragraph):
        # a command line, not a command's name: it has an option
        if (span.split()[0] in PROGRAMS or re.match(r"[A-Z_]+=\S+ (flwr|flower-)", span)) \
                and " -" in span:
            found += [(f"{path.relative_to(ROOT)} (inline)", argv) for argv in commands_in_text(span)]
    return found


def dockerfile_commands() -> list[tuple[str, list[str]]]:
    """The header's commented commands and the exec-form CMD."""
    text = DOCKERFILE.read_text().splitlines()
    header = []
    for number, line in enumerate(text, 1):
        if not line.startswith("#"):
            break
        if line.startswith("#  "):                              # an indented example
            header.append((number, line[1:]))
    found = [(f"Dockerfile:{n}", argv) for n, logical in shell_lines(header)
             for argv in commands_in_text(logical)]
    for number, line in enumerate(text, 1):
        if line.startswith(("CMD [", "ENTRYPOINT [")):
            argv = yaml.safe_load(line.split(None, 1)[1])
            if argv and argv[0] in PROGRAMS:
                found.append((f"Dockerfile:{number}", argv))
    return found


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_commands() -> list[tuple[str, list[str]]]:
    """Each service's command (exec form, or the Flower commands in a ``bash -c``
    string) and the commands in the file's comments."""
    found = []
    for name, service in compose()["services"].items():
        command = service.get("command") or []
        if isinstance(command, str):
            command = shlex.split(command)
        if command and command[0] in PROGRAMS:
            found.append((f"compose.yaml services.{name}", command))
        elif command[:1] in (["bash"], ["sh"]) and "-c" in command:
            script = command[command.index("-c") + 1].replace("$$", "$")
            found += [(f"compose.yaml services.{name}", argv)
                      for argv in commands_in_text(script)]
    comments = [(n, line[1:]) for n, line in enumerate(COMPOSE.read_text().splitlines(), 1)
                if line.startswith("#  ")]                     # the header's examples
    found += [(f"compose.yaml:{n}", argv) for n, logical in shell_lines(comments)
              for argv in commands_in_text(logical)]
    return found


def script_commands() -> list[tuple[str, list[str]]]:
    """deploy_local.sh's invocations, each bash array ``"${NAME[@]}"`` expanded to every
    value the script assigns it and every other variable replaced by ``1``."""
    text = SCRIPT.read_text()
    arrays: dict[str, list[str]] = {}
    for name, body in re.findall(r"\b(\w+)=\(([^()]*)\)", text):
        arrays.setdefault(name, []).append(" ".join(body.split()))
    found = []
    for number, logical in shell_lines(list(enumerate(text.splitlines(), 1))):
        if not _MENTION.search(logical) or "<<" in logical:
            continue
        names = re.findall(r"\$\{(\w+)\[@\]\}", logical)
        choices = [arrays.get(name, [""]) for name in names if arrays.get(name)]
        for values in itertools.product(*choices):
            line = logical
            for name, value in zip([n for n in names if arrays.get(n)], values):
                line = line.replace(f'"${{{name}[@]}}"', value)
            line = re.sub(r"\$\{\w+\[[^\]]*\]\}", "1", line)
            line = re.sub(r"\$(?!FLWR_BIN_DIR\b)\{?\w+\}?", "1", line)
            line = re.sub(r'(\w+=\()?"(\$FLWR_BIN_DIR/[\w-]+)"', r" \2", line)
            found += [(f"deploy_local.sh:{number}", argv) for argv in commands_in_text(line)]
    return found


SOURCES = {"Dockerfile": dockerfile_commands, "compose.yaml": compose_commands,
           "deploy_local.sh": script_commands,
           **{str(page.relative_to(ROOT)): (lambda page=page: markdown_commands(page))
              for page in PAGES}}


# --- Tests --------------------------------------------------------------------------------

def test_the_parsers_refuse_what_flower_142_refuses():
    """The check fails on a removed, a deprecated or an unknown flag and on a bad value,
    and passes the 1.42 forms (the failing lines are the old Dockerfile header's)."""
    old = ("flower-supernode --insecure --superlink 127.0.0.1:9092 "
           "--clientappio-api-address 127.0.0.1:9094 --node-config 'partition-id=0'")
    assert "no longer supported" in flower_error(commands_in_text(old)[0])
    assert flower_error(["flower-superlink", "--insecure", "--fleet-api-address", "0:9092"])
    assert flower_error(["flower-supernode", "--insecure", "--port", "ninety"])
    assert flower_error(["flwr", "run", ".", "--no-such-flag"])
    assert flower_error(["flwr", "nope"])
    assert flower_error(["flower-superlink", "--insecure", "--host", "0.0.0.0", "--port",
                         "8000"]) is None
    assert flower_error(["flwr", "run", ".", "prod", "--stream", "--run-config", "a=1"]) is None
    assert flower_error(["flwr", "supernode", "register", "k.pub", "prod"]) is None


def test_the_extraction_reads_shell_as_written():
    assert commands_in_text("FLWR_HOME=/tmp/n0 flower-supernode --insecure ...") == [
        ["flower-supernode", "--insecure"]]
    assert commands_in_text("docker run --rm img flwr run . <connection> --stream 2>&1 | tee x") \
        == [["flwr", "run", ".", "PLACEHOLDER", "--stream"]]
    assert commands_in_text("pip install flwr") == []


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_every_flower_command_line_parses(source):
    failures = [f"{where}: {shlex.join(argv)}\n    -> {error}"
                for where, argv in SOURCES[source]()
                if (error := flower_error(argv)) is not None]
    assert not failures, "Flower 1.42 refuses:\n" + "\n".join(failures)


def test_every_shown_deployment_is_found():
    """The check reads the commands it should (it cannot pass on an empty list)."""
    programs = lambda source: sorted(argv[0] + (" " + argv[1] if argv[0] == "flwr" else "")
                                     for _, argv in SOURCES[source]())
    assert programs("Dockerfile") == ["flower-superlink", "flower-supernode",
                                      "flower-supernode"]   # header + CMD
    assert programs("compose.yaml").count("flower-supernode") == 3
    assert {"flower-superlink", "flwr run"} <= set(programs("compose.yaml"))
    assert {"flower-superlink", "flower-supernode", "flwr run", "flwr supernode"} \
        <= set(programs("deploy_local.sh"))
    assert programs("deploy_local.sh").count("flower-superlink") == 2   # TLS and insecure
    assert {"flower-superlink", "flower-supernode", "flwr run"} <= set(programs("docs/deployment.md"))
    assert "flwr run" in programs("README.md")


def test_the_compose_deployment_fits_together():
    """One port from SuperLink to SuperNodes to the CLI connection; as many SuperNodes as
    partitions and clients; run-config keys the app declares."""
    services = compose()["services"]
    link = services["superlink"]["command"]
    port = link[link.index("--port") + 1]
    assert link[link.index("--host") + 1] == "0.0.0.0"   # reachable from the other containers
    assert f"127.0.0.1:{port}:{port}" in services["superlink"]["ports"]
    nodes = {name: s["command"] for name, s in services.items() if name.startswith("supernode")}
    configs = [cmd[cmd.index("--node-config") + 1] for cmd in nodes.values()]
    assert {cmd[cmd.index("--superlink") + 1] for cmd in nodes.values()} == {f"superlink:{port}"}
    assert sorted(int(re.search(r"partition-id=(\d+)", c)[1]) for c in configs) == \
        list(range(len(nodes)))
    assert {re.search(r"num-partitions=(\d+)", c)[1] for c in configs} == {str(len(nodes))}

    connection = tomllib.loads(CLI_CONFIG.read_text())["superlink"]
    parsed = parse_superlink_connection(connection[connection["default"]], connection["default"])
    assert parsed.address == f"superlink:{port}" and parsed.insecure
    assert "/flwr-home/config.toml" in services["run"]["volumes"][0]
    assert services["run"]["environment"]["FLWR_HOME"] == "/flwr-home"

    default = re.fullmatch(r"\$\{RUN_CONFIG:-(.*)\}", services["run"]["environment"]["RUN_CONFIG"])
    run_config = parse_config_args([default[1]])
    app_keys = flatten_dict(tomllib.loads((ROOT / "pyproject.toml").read_text())
                            ["tool"]["flwr"]["app"]["config"])
    assert set(run_config) <= set(app_keys), set(run_config) - set(app_keys)
    assert run_config["federation.num-clients"] == len(nodes)
    output_volume = services["superlink"]["volumes"][0].split(":")[1]
    assert run_config["output-dir"] == output_volume   # the ServerApp runs in the SuperLink


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of the Dockerfile, continuation lines joined."""
    out, logical = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not logical and (not line.strip() or line.lstrip().startswith("#")):
            continue
        logical += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = logical.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
            logical = ""
    return out


def test_the_image_runs_as_a_user_who_owns_what_it_writes():
    """The image's processes are not root: the last USER is a user the image creates
    (after everything installed as root), and every folder the containers write (the
    Dockerfile's VOLUMEs, compose.yaml's mount points, the run's FLWR_HOME) is created
    and owned by that user; compose passes the user's ids the Dockerfile declares."""
    steps = dockerfile_instructions()
    users = [i for i, (word, _) in enumerate(steps) if word == "USER"]
    assert users, "the Dockerfile has no USER: its processes run as root"
    user = steps[users[-1]][1].split(":")[0]
    assert user not in ("root", "0")
    installs = [i for i, (word, args) in enumerate(steps) if word == "RUN" and "pip install" in args]
    assert installs and max(installs) < users[-1], "pip install must run before USER"
    created = [args for word, args in steps[:users[-1]]
               if word == "RUN" and re.search(rf"useradd .*\b{user}\b", args)]
    assert created, f"USER {user}: no RUN useradd creates it"
    owned = set()
    for _word, args in steps:
        for chown in re.finditer(r"chown (\S+) ((?:/\S+ ?)+)", args):
            if chown[1].split(":")[0] == user:
                owned |= set(chown[2].split())
    services = compose()["services"]
    mounts = {volume.split(":")[1] for s in services.values() for volume in s.get("volumes", [])}
    writable = {str(Path(m).parent) if Path(m).suffix else m for m in mounts}
    writable |= {s["environment"]["FLWR_HOME"] for s in services.values()
                 if "FLWR_HOME" in s.get("environment", {})}
    writable |= {v for word, args in steps if word == "VOLUME" for v in yaml.safe_load(args)}
    assert writable and writable <= owned, f"not owned by {user}: {sorted(writable - owned)}"
    declared = {args.split("=")[0] for word, args in steps if word == "ARG"}
    build_args = set(compose()["x-fedunlearn"]["build"]["args"])
    ids = {a for a in build_args if a.endswith(("_UID", "_GID"))}
    assert len(ids) == 2 and ids <= declared, (ids, declared)
