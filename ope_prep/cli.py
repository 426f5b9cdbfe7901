"""The `ope-prep` command: the runner and every stage under one name, beside the numbered scripts.

    ope-prep run 5                 python run_pipeline.py 5
    ope-prep status                python run_pipeline.py --status
    ope-prep plan 10000            python run_pipeline.py 10000 --plan
    ope-prep check-providers       python run_pipeline.py --check-providers
    ope-prep prepare --samples 5   python 01_prepare_data.py --samples 5 (and generate, logprobs,
                                   judge, oracle, summarize: 02 ... 05)

Every flag after the command is the script's own (`ope-prep run --help`, `ope-prep judge --help`).
The package is installed from its checkout (`pip install -e .`, which setup.sh does): the runner
starts each stage as its numbered script, and config.yaml and models/ live there.
"""

from __future__ import annotations

import sys

from .stages import STAGE_ALIASES, STAGES

# command -> the runner's flag it stands for (None: the runner itself)
RUNNER_COMMANDS = {"run": None, "status": "--status", "plan": "--plan", "check-providers": "--check-providers"}
STAGE_NUMBERS = {name: number for number, name in STAGE_ALIASES.items()}


def usage() -> str:
    stages = "\n".join(f"  {name:<16}stage {STAGE_NUMBERS[name]}, as python {script}" for name, script in STAGES)
    return (f"usage: ope-prep COMMAND [flags]\n\n{__doc__.splitlines()[0]}\n\ncommands:\n"
            "  run [N]         all stages on N prompts (default 10000); resumes, grows a finished run\n"
            "  status          where the run in the config's data directory stands (read-only)\n"
            "  plan [N]        what a run of N prompts asks for and how long it takes; writes nothing\n"
            "  check-providers the engine check of every model behind an endpoint, then exit\n"
            f"{stages}\n\n'ope-prep COMMAND --help' lists a command's flags.")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    sys.argv[0] = f"ope-prep {command}"      # argparse's usage lines name what was typed
    if command in RUNNER_COMMANDS:
        from .pipeline import main as run_main
        flag = RUNNER_COMMANDS[command]
        return run_main(rest + ([flag] if flag else []))
    scripts = dict(STAGES)
    if command in scripts:
        from . import runner
        add_args = None
        if command == "prepare":
            from .stages.prepare import add_args
        return runner.main(command, f"Stage {STAGE_NUMBERS[command]} ({command}), as python {scripts[command]}.",
                              add_args, rest)
    print(f"error: ope-prep: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    return 2


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
