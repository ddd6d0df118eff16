"""List the registered stages: `python -m rlhf.stages` (every `algo=` choice, what it needs and follows)."""
from rlhf.stages import stages


def main() -> None:
    known = stages()
    width = max(map(len, known))
    for name, cls in known.items():
        needs = ", ".join(cls.needs) or "-"
        print(f"{name:<{width}}  needs {needs:<14} produces {cls.produces or '-':<7} {cls.title}: {cls.paper}")


if __name__ == "__main__":
    main()
