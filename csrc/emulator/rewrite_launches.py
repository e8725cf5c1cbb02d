"""Rewrites CUDA launches for the emulator: kernel<<<grid, block, shared, stream>>>(args)
becomes ::pyflat_emu::launcher(kernel, "kernel", grid, block, shared, stream)(args).

    python rewrite_launches.py in.cu out.cpp

Fails (exit status 1) if a launch is left that the pattern did not take, so a launch
written in another form cannot slip past the emulator unrun.
"""
import re
import sys

LAUNCH = re.compile(r"(?P<kernel>[A-Za-z_][\w:]*(?:<[^;<>()]*>)?)\s*<<<(?P<config>[^;]*?)>>>\s*\(")


def rewrite(text: str) -> str:
    return LAUNCH.sub(lambda m: f'::pyflat_emu::launcher({m["kernel"]}, "{m["kernel"]}", '
                                f'{m["config"]})(', text)


def main(argv: list[str]) -> int:
    source, target = argv[1], argv[2]
    with open(source) as f:
        text = rewrite(f.read())
    left = [n + 1 for n, line in enumerate(text.splitlines()) if "<<<" in line or ">>>" in line]
    if left:
        print(f"{source}: launches the emulator rewrite did not take, lines {left}",
              file=sys.stderr)
        return 1
    with open(target, "w") as f:
        f.write(f'#line 1 "{source}"\n' + text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
