"""Rewrites a .cu source for the CPU emulator of CUDA's execution model (cuda_emulator.h).

    python rewrite_for_emulator.py in.cu out.cpp

- A launch kernel<<<grid, block, shared, stream>>>(args) becomes
  ::pyflat_emu::launcher(kernel, "kernel", grid, block, shared, stream)(args).
- A static shared array declared in a function, `__shared__ T name[N]...;`, becomes a
  function static (one per kernel instantiation, shared by the block's fibers, as blocks
  run one at a time) followed by a call that poisons it at the start of each block.

Fails (exit status 1) if a launch or a __shared__ is left that the patterns did not take
(dynamic `extern __shared__` among them), so nothing slips past the emulator unrun.
"""
import re
import sys

LAUNCH = re.compile(r"(?P<kernel>[A-Za-z_][\w:]*(?:<[^;<>()]*>)?)\s*<<<(?P<config>[^;]*?)>>>\s*\(")
SHARED = re.compile(r"(?<![\w])__shared__\s+(?P<type>[A-Za-z_][\w:<>, ]*?)\s+"
                    r"(?P<name>[A-Za-z_]\w*)(?P<extents>(?:\s*\[[^\];]+\])*)\s*;")


def rewrite(text: str) -> str:
    text = LAUNCH.sub(lambda m: f'::pyflat_emu::launcher({m["kernel"]}, "{m["kernel"]}", '
                                f'{m["config"]})(', text)
    return SHARED.sub(lambda m: f'static {m["type"]} {m["name"]}{m["extents"]}; '
                                f'::pyflat_emu::shared_memory(&{m["name"]}, sizeof({m["name"]}), '
                                f'"{m["name"]}");', text)


def main(argv: list[str]) -> int:
    source, target = argv[1], argv[2]
    with open(source) as f:
        text = rewrite(f.read())
    for token, what in (("<<<", "launches"), (">>>", "launches"),
                        ("__shared__", "__shared__ declarations")):
        left = [n + 1 for n, line in enumerate(text.splitlines())
                if token in line.split("//")[0]]
        if left:
            print(f"{source}: {what} the emulator rewrite did not take, lines {left}",
                  file=sys.stderr)
            return 1
    with open(target, "w") as f:
        f.write(f'#line 1 "{source}"\n' + text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
