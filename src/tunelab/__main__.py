"""The `tunelab` command (and `python -m tunelab`, what compare-methods uses for its child runs): restarted under
tcmalloc where the system has it (tunelab/allocator.py) before anything heavy is imported."""

from tunelab.allocator import restart_under_tcmalloc


def main() -> None:
    restart_under_tcmalloc()
    from tunelab.cli import app

    app(prog_name="tunelab")


if __name__ == "__main__":
    main()
