"""envs.py: the benchmarks behind one tiny gym-like interface, plus the code-interpreter sandbox.

Part of the single-file SPEAR reference (arXiv 2509.22601). Every env answers

    obs, info = env.reset(seed)                       # same seed -> same start state
    obs, reward, done, info = env.step(action_text)   # action_text = the model's whole reply

where `obs` is always the text of the next *user message* (templates already applied).
`env.context` tells the trainer how to build samples:
  "history"  each turn is its own sample; the prompt is rebuilt from the current observation and the
             last K (observation, action) pairs (spec §9.2). Sokoban.
  "full"     the whole conversation is one sample; `obs` after a tool call is the tool output,
             to be appended as the next user message. Math with the code tool.
`info` always holds: won, action_valid (format validity, spec §9.3), tool_calls (calls made this
step), anchor (the raw observation, for GiGPO), admissible_actions (list or None), action (the
parsed action actually executed) and task_type.

    python envs.py    # prints Sokoban resets/s, steps/s and the sandbox's median latency

Deviations from the official code (verl-agent / verl recipe/spear), on purpose:
 1. Sokoban: our own generator and dynamics with gym-sokoban's rules and verl-agent's player drift;
    a local random.Random(seed) instead of the global RNGs, so levels differ from the official
    ones seed for seed. Every level is checked by BFS to be solvable within `max_turns` moves
    (regenerated from a derived seed if not); the official generator does not check.
 2. Sokoban: "still" (no or unrecognised action) counts as a turn. The official env does not
    advance its own step counter on "still", but its rollout loop stops after 15 turns anyway,
    so episodes end at the same point.
 3. Sokoban text mode only (the paper ran the visual variant with a VLM).
 4. Math: besides the official Hermes `<tool_call>{"name": "code_interpreter", ...}</tool_call>`,
    a ```python fenced block or <code>...</code> also counts as a tool call: small models such as
    SmolLM2 write fenced Python and never Hermes JSON (reference/models.md §7).
 5. Math: the tool protocol is described in the user message (the official code injects a tool
    schema through the chat template; CODE_INTERPRETER_TOOL holds that schema if you want it).
    Tool output comes back as "<output>\n...\n</output>" in the next user message.
 6. Math: a timed-out call answers "Tool API failed! Please try again. (timed out after 10 s)":
    the official text plus the reason. Default timeout 10 s (SandboxFusion ran 30 s). A process
    killed by a signal gets a stderr line naming the signal. Lines holding only the ~~^^ markers
    of Python >= 3.11 tracebacks are skipped when picking the last two stderr lines.
 7. Math: the sandbox is a local subprocess, not a SandboxFusion HTTP server; it cannot start
    processes (threads are fine) and sees only system and Python files, see run_code. `np` in
    the official prelude is imported on first use (numpy costs ~0.2 s a call otherwise).
 8. Math data: duplicated prompts are dropped on load (DAPO-Math-17k stores each ~100 times);
    with no data file, a generated integer-arithmetic task family stands in.
"""
import contextlib
import ctypes
import functools
import json
import logging
import operator
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque


class Env:
    """What every benchmark has besides reset(seed) and step(action_text) (DESIGN.md, envs.py)."""
    name = ""
    max_turns = 0          # env steps (agent) or assistant turns (math) before the episode ends
    context = "history"    # "history": one sample per turn; "full": one sample per episode


def make_env(name, **kwargs):
    """Build an env by name; kwargs go to its constructor."""
    if name == "sokoban":
        return SokobanEnv(**kwargs)
    if name == "math":
        return MathEnv(**kwargs)
    if name == "alfworld":
        raise ValueError("env 'alfworld' is not available in this version yet; it will need "
                         "`pip install alfworld` and its games from `alfworld-download`")
    if name == "webshop":
        raise ValueError("env 'webshop' is not available in this version yet; it will need the "
                         "WebShop engine and data installed from github.com/princeton-nlp/WebShop")
    raise ValueError(f"unknown env {name!r}; choose one of: sokoban, math "
                     "(alfworld and webshop are planned)")


# ---------------------------------------------------------------------------------------------
# Sokoban (envs.md §5, spec §7.1, §9.2, §9.3)
# ---------------------------------------------------------------------------------------------

MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
SOKOBAN_ACTIONS = ["up", "down", "left", "right"]
# The five 3x3 floor stamps of gym-sokoban's random walk, as offsets from the walker.
_FLOOR_STAMPS = [
    [(0, -1), (0, 0), (0, 1)],            # horizontal bar
    [(-1, 0), (0, 0), (1, 0)],            # vertical bar
    [(0, -1), (0, 0), (1, 0)],            # corner
    [(0, -1), (0, 0), (1, -1), (1, 0)],   # 2x2 block
    [(0, 0), (0, 1), (1, 0)],             # mirrored corner
]


def _add(cell, delta):
    return cell[0] + delta[0], cell[1] + delta[1]


def _random_floor(rng, dim):
    """Topology: a random walk that stamps floor shapes, turning with p=0.35; the border stays wall."""
    pos = (rng.randint(1, dim - 2), rng.randint(1, dim - 2))
    direction = rng.choice(list(MOVES.values()))
    floor = set()
    for _ in range(int(1.7 * (dim + dim))):
        if rng.random() < 0.35:
            direction = rng.choice(list(MOVES.values()))
        pos = (min(max(pos[0] + direction[0], 1), dim - 2), min(max(pos[1] + direction[1], 1), dim - 2))
        floor.update(_add(pos, d) for d in rng.choice(_FLOOR_STAMPS))
    return {(r, c) for r, c in floor if 0 < r < dim - 1 and 0 < c < dim - 1}


def _reverse_play(floor, targets, player, search_depth, max_states=300_000):
    """Start solved and pull boxes around by depth-first search (gym-sokoban's reverse play).

    Score = box switches x summed Manhattan displacement of the boxes from their targets; the
    best-scoring state is the level. Every pull reversed is a push, so the level is solvable.
    """
    best = (0, player, targets)
    seen = set()

    def dfs(player, boxes, last_box, switches, ttl):
        nonlocal best
        if ttl <= 0 or len(seen) >= max_states or (player, boxes) in seen:
            return
        seen.add((player, boxes))
        displacement = sum(abs(b[0] - t[0]) + abs(b[1] - t[1]) for b, t in zip(boxes, targets))
        if switches * displacement > best[0]:
            best = (switches * displacement, player, boxes)
        for delta in MOVES.values():
            step = _add(player, delta)
            if step not in floor or step in boxes:
                continue
            behind = (player[0] - delta[0], player[1] - delta[1])
            new_boxes, new_last, new_switches = boxes, last_box, switches
            if behind in boxes:  # the player drags the box behind it into its old cell
                i = boxes.index(behind)
                new_boxes = boxes[:i] + (player,) + boxes[i + 1:]
                new_last, new_switches = i, switches + (i != last_box)
            dfs(step, new_boxes, new_last, new_switches, ttl - 1)

    dfs(player, targets, None, 0, search_depth)
    return best


def _shortest_solution(floor, targets, boxes, player, limit):
    """BFS over (player, boxes): the fewest moves that put every box on a target, or None if > limit."""
    goal = frozenset(targets)
    frontier, seen = deque([(player, boxes, 0)]), {(player, boxes)}
    while frontier:
        player, boxes, n = frontier.popleft()
        if frozenset(boxes) == goal:
            return n
        if n == limit:
            continue
        for action in SOKOBAN_ACTIONS:
            new_boxes, new_player, _ = sokoban_move(floor, boxes, player, action)
            if (new_player, new_boxes) not in seen:
                seen.add((new_player, new_boxes))
                frontier.append((new_player, new_boxes, n + 1))
    return None


def generate_sokoban(seed, dim=6, num_boxes=1, search_depth=30, max_moves=15):
    """A solvable level from a seed: (floor, targets, boxes, player); cells are (row, col).

    envs.md §5.1: random-walk topology, player and targets on random floor cells, reverse play
    (topology retried up to 4 times on score 0), then verl-agent's player drift. A level that the
    BFS cannot solve within `max_moves` is regenerated from a derived seed (deviation 1).
    """
    for attempt in range(1000):
        # String seeds are hashed with SHA-512 by `random`: deterministic across runs and machines.
        rng = random.Random(seed if attempt == 0 else f"{seed}/retry{attempt}")
        level = _try_level(rng, dim, num_boxes, search_depth)
        if level is not None and _shortest_solution(*level, limit=max_moves) is not None:
            return level
    raise RuntimeError(f"no solvable Sokoban level for seed {seed}")


def _try_level(rng, dim, num_boxes, search_depth):
    """One level from one RNG stream, or None when 4 topologies in a row give reverse-play score 0."""
    for _ in range(4):
        floor = _random_floor(rng, dim)
        if len(floor) < num_boxes + 2:
            continue
        cells = rng.sample(sorted(floor), num_boxes + 1)
        player, targets = cells[0], tuple(cells[1:])
        score, player, boxes = _reverse_play(floor, targets, player, search_depth)
        if score > 0:
            break
    else:
        return None
    # verl-agent's drift: walk the player 1-3 cells (no backtracking) so it does not always start
    # next to the box; more likely when the box moved only one cell.
    displacement = sum(abs(b[0] - t[0]) + abs(b[1] - t[1]) for b, t in zip(boxes, targets))
    p_move, previous = (0.8 if displacement == 1 else 0.5), None
    for _ in range(3):
        options = [c for c in (_add(player, d) for d in MOVES.values())
                   if c in floor and c not in boxes and c != previous]
        if not options or rng.random() >= p_move:
            break
        previous, player, p_move = player, rng.choice(options), 0.5
    return frozenset(floor), targets, boxes, player


def sokoban_move(floor, boxes, player, action):
    """gym-sokoban's push action: walk, or push the box ahead if the cell behind it is free.

    Returns (boxes, player, moved). Walking into a wall, or pushing a box into a wall or another
    box, leaves everything in place (a valid action that has no effect).
    """
    delta = MOVES[action]
    ahead = _add(player, delta)
    if ahead not in floor:
        return boxes, player, False
    if ahead in boxes:
        beyond = _add(ahead, delta)
        if beyond not in floor or beyond in boxes:
            return boxes, player, False
        i = boxes.index(ahead)
        boxes = boxes[:i] + (beyond,) + boxes[i + 1:]
    return boxes, ahead, True


def render_sokoban(floor, targets, boxes, player, shape):
    """The official text grid: each cell ' <sym> \\t', rows joined by newlines (envs.md §5.1)."""
    def symbol(cell):
        if cell == player:
            return "S" if cell in targets else "P"
        if cell in boxes:
            return "√" if cell in targets else "X"
        if cell in targets:
            return "O"
        return "_" if cell in floor else "#"
    return "\n".join("".join(f" {symbol((r, c))} \t" for c in range(shape[1])) for r in range(shape[0]))


_CJK = re.compile("[\u4e00-\u9fff]")


def parse_sokoban_action(text):
    """Spec §9.3 / envs.md §5.1: (action, valid) from the model's reply.

    Lower-case; take the text between the first <action> and the first </action>; the action is
    the first of up/down/left/right/still (in that order, as in the official code) contained in it.
    Missing tags or no match -> "still" and invalid. Missing <think> or </think>, or any CJK
    character, makes the step invalid but the parsed action is still executed.
    """
    text = text.lower()
    start, end = text.find("<action>"), text.find("</action>")
    if start == -1 or end == -1:
        return "still", False
    inner = text[start + len("<action>"):end]
    action = next((a for a in SOKOBAN_ACTIONS + ["still"] if a in inner), None)
    if action is None:
        return "still", False
    valid = "<think>" in text and "</think>" in text and not _CJK.search(text)
    return action, valid


_SOKOBAN_RULES = """You are an expert Sokoban player.
Grid symbols: # wall, _ floor, O target, X box, √ box on a target, P you (the player), S you standing on a target.
Goal: push every box onto a target.
Rules: each action moves you one cell up, down, left or right. Walking into a box pushes it one cell further, but only if that cell is free. You cannot pull a box or push two boxes at once, and a box pushed into a corner can never be moved out again."""

_SOKOBAN_ENDING = """Your admissible actions are ["up", "down", "left", "right"].

Now choose your next move. First reason step by step about where the box and the target are and how to push the box there without getting it stuck; put this reasoning inside <think> </think>. Then give exactly one admissible action inside <action> </action>, for example <action>left</action>."""


class SokobanEnv(Env):
    """6x6 Sokoban with one box, text observations, gym-sokoban rewards (spec §7.1).

    Reward per step: -0.1; +1 when a box lands on a target, -1 when one leaves it; +10 when all
    boxes are on targets. Done when solved or after `max_turns` steps. An unrecognised action is
    "still": no move, -0.1, action_valid=False. Stepping after done changes nothing (reward 0).
    split="train" uses the seed as given; any other split adds 65536 (the official val range).
    """
    name, context = "sokoban", "history"

    def __init__(self, dim=6, num_boxes=1, max_turns=15, history_length=2, search_depth=30,
                 split="train"):
        self.dim, self.num_boxes, self.max_turns = dim, num_boxes, max_turns
        self.history_length, self.search_depth = history_length, search_depth
        self.seed_offset = 0 if split == "train" else 65536

    def reset(self, seed):
        level = generate_sokoban(seed + self.seed_offset, self.dim, self.num_boxes,
                                 self.search_depth, self.max_turns)
        return self._start(*level, shape=(self.dim, self.dim))

    def reset_to(self, rows):
        """Start from a hand-made level: rows of grid symbols (# _ O X √ P S), e.g. for tests."""
        cells = {(r, c): ch for r, row in enumerate(rows) for c, ch in enumerate(row)}
        floor = frozenset(cell for cell, ch in cells.items() if ch != "#")
        targets = tuple(sorted(cell for cell, ch in cells.items() if ch in "O√S"))
        boxes = tuple(sorted(cell for cell, ch in cells.items() if ch in "X√"))
        player = next(cell for cell, ch in cells.items() if ch in "PS")
        return self._start(floor, targets, boxes, player, shape=(len(rows), max(map(len, rows))))

    def _start(self, floor, targets, boxes, player, shape):
        self.floor, self.targets, self.boxes, self.player, self.shape = floor, targets, boxes, player, shape
        self.turn, self.done, self.won, self.memory = 0, False, False, []
        grid = self._grid()
        return self.build_prompt(grid, [], 0), self._info(grid, "", True, False, 0)

    def step(self, action_text):
        before = self._grid()
        action, valid = parse_sokoban_action(action_text)
        if self.done:  # nothing moves any more
            return self.build_prompt(before, self._history(), self.turn), 0.0, True, \
                self._info(before, action, valid, self.won, 0)
        reward, moved = -0.1, False
        if action != "still":
            on_target = self._boxes_on_target()
            self.boxes, self.player, moved = sokoban_move(self.floor, self.boxes, self.player, action)
            now_on_target = self._boxes_on_target()
            reward += 1.0 if now_on_target > on_target else -1.0 if now_on_target < on_target else 0.0
        self.won = self._boxes_on_target() == len(self.boxes)
        reward += 10.0 if self.won else 0.0
        self.turn += 1
        self.done = self.won or self.turn >= self.max_turns
        self.memory.append((before, action))
        grid = self._grid()
        info = self._info(grid, action, valid, self.won, 1)
        info["action_is_effective"] = moved
        return self.build_prompt(grid, self._history(), self.turn), reward, self.done, info

    def build_prompt(self, obs_raw, history, turn):
        """Spec §9.2: legend, goal, rules, grid, actions; from step 2 on also the last K pairs."""
        if not history:
            return f"{_SOKOBAN_RULES}\n\nYour current observation is:\n{obs_raw}\n{_SOKOBAN_ENDING}"
        first = turn - len(history) + 1  # pairs are numbered by the step they happened at
        pairs = "\n".join(f"[Observation {first + i}: '{obs}', Action {first + i}: '{act}']"
                          for i, (obs, act) in enumerate(history))
        return (f"{_SOKOBAN_RULES}\n\nYou have already taken {turn} step(s). Your most recent "
                f"{len(history)} observation(s) and the action taken after each:\n{pairs}\n"
                f"You are now at step {turn + 1}. Your current observation is:\n{obs_raw}\n"
                f"{_SOKOBAN_ENDING}")

    def _history(self):
        return self.memory[-self.history_length:] if self.history_length > 0 else []

    def _grid(self):
        return render_sokoban(self.floor, self.targets, self.boxes, self.player, self.shape)

    def _boxes_on_target(self):
        return sum(b in self.targets for b in self.boxes)

    def _info(self, grid, action, valid, won, tool_calls):
        # Every turn counts as one "tool call" for SPEAR's intrinsic reward (spec §7.3).
        return {"won": won, "action_valid": valid, "tool_calls": tool_calls, "anchor": grid,
                "admissible_actions": list(SOKOBAN_ACTIONS), "action": action,
                "task_type": "sokoban", "action_is_effective": False}


# ---------------------------------------------------------------------------------------------
# Code-interpreter sandbox (spec §9.5, envs.md §6.4)
# ---------------------------------------------------------------------------------------------

# Runs inside the sandboxed interpreter before the model's code (in `-c`, so main.py holds the
# model's code alone and traceback line numbers match it). It (1) lets the process read only
# system and Python directories and write only below its working directory (Landlock, which binds
# root too), and keeps it from signalling, ptracing or reading /proc of processes outside
# (Landlock ABI >= 6) and from TCP (ABI >= 4);
# (2) installs a seccomp filter so fork/vfork/clone fail with EPERM unless they create a thread;
# (3) runs the official prelude of star-imports (and `np`, imported on first use) and main.py.
_SANDBOX_BOOT = r'''
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
ulong = ctypes.c_ulong

def landlock(workdir):
    if sys.platform != "linux":
        return
    abi = libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # ruleset version query
    if abi < 1:
        return
    class Ruleset(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]
    class Beneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]
    # Access bits: 1 write file, 2 read file, 3 read dir, 4-12 remove/make entries, 13 refer
    # (ABI 2), 14 truncate (ABI 3). Net bits: TCP bind, connect (ABI 4). Scopes: abstract unix
    # sockets, signals (ABI 6). Whatever is handled and not granted by a rule below is denied.
    file_bits = 1 << 1 | 1 << 2 | (1 << 14 if abi >= 3 else 0)
    read = 1 << 2 | 1 << 3
    write = 1 << 1 | (1 << 14 if abi >= 3 else 0) | (1 << 13 if abi >= 2 else 0) | sum(1 << b for b in range(4, 13))
    attr = Ruleset(read | write, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    ruleset = libc.syscall(444, ctypes.byref(attr), ctypes.c_size_t(24), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    # Read: the system dirs and everything Python imports from; write: only the working dir.
    system = ["/usr", "/lib", "/lib64", "/etc", "/dev", "/proc", "/sys", sys.prefix, sys.base_prefix]
    rules = [(p, read) for p in system + sys.path if p and os.path.exists(p)]
    for path, allowed in rules + [(workdir, read | write), ("/dev/null", read | write)]:
        if not os.path.isdir(path):  # a rule on a file may only carry file rights
            allowed &= file_bits
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        if libc.syscall(445, ruleset, 1, ctypes.byref(Beneath(allowed, fd)), ctypes.c_uint32(0)):
            raise OSError(ctypes.get_errno(), "landlock_add_rule")
        os.close(fd)
    libc.prctl(38, ulong(1), ulong(0), ulong(0), ulong(0))  # no_new_privs
    if libc.syscall(446, ruleset, ctypes.c_uint32(0)):
        raise OSError(ctypes.get_errno(), "landlock_restrict_self")

def no_new_processes():
    arch = {"x86_64": (0xC000003E, 56, (57, 58)), "aarch64": (0xC00000B7, 220, ())}.get(os.uname().machine)
    if sys.platform != "linux" or arch is None:
        return
    audit_arch, clone, forks = arch
    ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x50000 | 1, 0x50000 | 38
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, audit_arch), (RET, 0, 0, EPERM),  # foreign syscall ABI
            (LD, 0, 0, 0), (JGE, 0, 1, 0x40000000), (RET, 0, 0, EPERM),   # x32 numbers
            (JEQ, 0, 1, 435), (RET, 0, 0, ENOSYS)]                        # clone3: libc falls back
    for nr in forks:
        prog += [(JEQ, 0, 1, nr), (RET, 0, 0, EPERM)]
    prog += [(JEQ, 1, 0, clone), (RET, 0, 0, ALLOW),
             (LD, 0, 0, 16), (JSET, 0, 1, 0x10000), (RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]
    class Insn(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Insn))]
    insns = (Insn * len(prog))(*prog)
    libc.prctl(38, ulong(1), ulong(0), ulong(0), ulong(0))
    if libc.prctl(22, ulong(2), ctypes.byref(Prog(len(prog), insns)), ulong(0), ulong(0)):
        raise OSError(ctypes.get_errno(), "seccomp")

try:
    landlock(os.getcwd())
    no_new_processes()
except Exception as exc:
    sys.stderr.write(f"Sandbox setup failed: {exc!r}\n")
    sys.exit(70)
MODULES = ("string re datetime collections heapq bisect copy math random statistics itertools "
           "functools operator io sys json typing").split()
g = {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__}
exec("".join(f"import {m}\nfrom {m} import *\n" for m in MODULES), g)

class LazyNumpy:  # `np` as in the official prelude, but importing numpy (~0.2 s) only when used
    def __getattr__(self, name):
        import numpy
        g["np"] = numpy
        return getattr(numpy, name)
g["np"] = LazyNumpy()
sys.argv = ["main.py"]
exec(compile(open("main.py", encoding="utf-8").read(), "main.py", "exec"), g)
'''

_FENCE = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.S)


@functools.lru_cache(maxsize=None)
def _namespace_prefix():
    """`unshare --net --pid ...` when this machine allows it (probed once), else nothing.

    --net: a fresh network namespace with no interfaces, so no network at all. --pid with
    --kill-child: the code runs as pid 1 of its own namespace, so when it dies, or `unshare` is
    killed, every process left inside dies with it. --map-root-user: needed to create them.
    """
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    cmd = (exe, "--net", "--pid", "--kill-child", "--map-root-user")
    try:
        ok = subprocess.run(cmd + ("true",), capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return cmd if ok else ()


def sandbox_features():
    """What isolation this machine gives run_code: {network_namespace, landlock_abi, seccomp}."""
    abi = -1
    if sys.platform == "linux":
        abi = ctypes.CDLL(None, use_errno=True).syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return {"network_namespace": bool(_namespace_prefix()), "landlock_abi": max(abi, 0),
            "seccomp": sys.platform == "linux" and os.uname().machine in ("x86_64", "aarch64")}


def _truncate_middle(text, limit):
    """Keep the head and tail of a long text (the official tool output cap is 16,384 chars)."""
    if len(text) <= limit:
        return text
    marker = f"\n...[{len(text) - limit} characters truncated]...\n"
    half = max(limit - len(marker), 0) // 2
    return text[:half] + marker + text[len(text) - half:]


def _read_capped(path, limit):
    """Read at most 2*limit bytes of a file (its head and tail), so huge output cannot fill RAM."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= 2 * limit:
            return f.read().decode("utf-8", "replace"), False
        head = f.read(limit)
        f.seek(size - limit)
        tail = f.read(limit)
    cut = f"\n...[{size - 2 * limit} bytes truncated]...\n"
    return head.decode("utf-8", "replace") + cut + tail.decode("utf-8", "replace"), True


def run_code(code, timeout=10.0, memory_mb=1024, max_output_chars=16384):
    """Run Python code in a fresh, isolated process; returns stdout/stderr and how it ended.

    Spec §9.5. A ```python fence is stripped (its body kept). What is isolated:
      - resources: RLIMIT_AS = memory_mb, RLIMIT_CPU = timeout + 1 s, RLIMIT_FSIZE = 16 MB per
        file, RLIMIT_NOFILE = 64, no core dumps; the wall clock is enforced by killing the whole
        process group (also after a normal exit). stdout/stderr go to files and only their head
        and tail (2 x max_output_chars bytes) are read back.
      - processes: a seccomp filter makes fork/vfork/clone fail unless they create a thread, so a
        fork bomb dies at its first fork. (RLIMIT_NPROC does not work here: the kernel exempts
        uid 0 even inside a user namespace, and for other users it counts all their processes.)
      - files: Landlock lets the code write only inside its fresh temporary directory (removed
        afterwards) and read only there, in /usr /lib /lib64 /etc /dev /proc /sys and in Python's
        prefix and sys.path; so not your home, project, checkpoints or tokens. It binds root too.
      - environment: a minimal env (PATH, HOME, TMPDIR = the sandbox dir, 1 BLAS thread), so
        secrets in the caller's os.environ are invisible; `python -I` ignores PYTHON* variables.
      - network and other processes: no network (`unshare --net`; Landlock also blocks TCP), its
        own pid namespace, and no signals/ptrace/proc access outside its Landlock domain.
    Each layer is used when the kernel offers it (sandbox_features() says which); without Landlock
    the code can write wherever the calling user can. Resource isolation, not a security boundary.
    """
    fence = _FENCE.search(code)
    if fence:
        code = fence.group(1)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    limits = []
    for kind, value in [(resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_CPU, int(timeout) + 1),
                        (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)]:
        hard = resource.getrlimit(kind)[1]  # asking for more than our own hard limit would fail
        limits.append((kind, value if hard == resource.RLIM_INFINITY else min(value, hard)))

    def set_limits():  # runs in the child between fork and exec: keep it tiny
        for kind, value in limits:
            resource.setrlimit(kind, (value, value))

    with tempfile.TemporaryDirectory(prefix="spear-sandbox-", ignore_cleanup_errors=True) as tmp:
        workdir = os.path.join(tmp, "work")  # the code's cwd; the output files sit outside it
        os.mkdir(workdir)
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        env.update(HOME=workdir, TMPDIR=workdir)
        cmd = [*_namespace_prefix(), sys.executable, "-I", "-B", "-c", _SANDBOX_BOOT]
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        start, timed_out, returncode = time.perf_counter(), False, None
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=err, preexec_fn=set_limits,
                                        start_new_session=True)
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group, finished or not
            returncode = proc.wait()
        except (OSError, subprocess.SubprocessError) as exc:  # could not start at all
            with open(err_path, "a") as err:
                err.write(f"could not start the sandbox: {exc!r}\n")
        seconds = time.perf_counter() - start
        stdout, cut_out = _read_capped(out_path, max_output_chars)
        stderr, cut_err = _read_capped(err_path, max_output_chars)
    if returncode is not None and returncode < 0 and not timed_out:
        stderr += f"\nProcess killed by signal {-returncode} ({signal.strsignal(-returncode)})"
    return {"stdout": stdout, "stderr": stderr, "returncode": returncode,
            "finished": returncode is not None and not timed_out, "timed_out": timed_out,
            "timeout": timeout, "seconds": seconds, "truncated": cut_out or cut_err}


def format_tool_output(result, max_chars=16384):
    """The official tool message (spec §9.5), with the reason added on a timeout (deviation 6)."""
    if not result["finished"]:
        reason = f" (timed out after {result['timeout']:g} s)" if result["timed_out"] else ""
        return "Tool API failed! Please try again." + reason
    # Python >= 3.11 underlines the failing expression with ~~^^ lines; skipping them keeps the
    # code line in the last two (deviation 6).
    errors = [line for line in result["stderr"].splitlines() if line.strip(" ~^")]
    if errors:
        text = "\n".join(errors[-2:]) + "\nErrors occurred! Check your code."
    else:
        text = result["stdout"].strip() or "Empty stdout! You might forget to print the answer."
    return _truncate_middle(text, max_chars)


# ---------------------------------------------------------------------------------------------
# Math with the code tool (spec §7.1, §9.4-§9.6, envs.md §6)
# ---------------------------------------------------------------------------------------------

CODE_INTERPRETER_TOOL = {"type": "function", "function": {
    "name": "code_interpreter", "description": "Run Python code and return what it prints.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}}

_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_CODE_TAG = re.compile(r"<code>(.*?)</code>", re.S)


def _hermes_code(body):
    """The `code` argument of a Hermes code_interpreter call, or None if the JSON is malformed."""
    try:
        call = json.loads(body)
        args = call["arguments"]
        args = json.loads(args) if isinstance(args, str) else args
        code = args["code"]
    except (ValueError, TypeError, KeyError):
        return None
    return code if call.get("name") == "code_interpreter" and isinstance(code, str) else None


def extract_tool_call(text):
    """(code or None, malformed) for one assistant turn: the first call is the one that runs.

    Candidates, by position: Hermes <tool_call> JSON (official), ```python fences and <code> tags
    (deviation 4). A <tool_call> whose JSON does not parse is skipped, as the official parser does,
    and flags the turn as malformed.
    """
    found, malformed = [], False
    for m in _HERMES.finditer(text):
        code = _hermes_code(m.group(1))
        malformed |= code is None
        if code is not None:
            found.append((m.start(), code))
    found += [(m.start(), m.group(0)) for m in _FENCE.finditer(text)]  # run_code strips the fence
    found += [(m.start(), m.group(1)) for m in _CODE_TAG.finditer(text)]
    return (min(found)[1] if found else None), malformed


def last_boxed(text):
    """Content of the last brace-matched \\boxed{...} in text, or None."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None


def strict_box_correct(response, ground_truth):
    """Spec §9.6 (math_dapo strict box): last 300 chars, then last 100, last \\boxed{}, exact match."""
    window = response[-300:][-100:]  # two slices as in the official code; the net effect is 100
    return last_boxed(window) == ground_truth


def math_verify_correct(response, ground_truth):
    """Lenient check with math-verify (envs.md §6.3); gold wrapped in $...$ so LaTeX golds parse."""
    from math_verify import parse, verify
    # math-verify times out with signal.alarm, which only works in the main thread; elsewhere its
    # timeouts must be off (and it warns about that on every call, hence the log level).
    main = threading.current_thread() is threading.main_thread()
    if not main:
        logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold = parse(f"${ground_truth}$", **({} if main else {"parsing_timeout": None}))
    pred = parse(response, **({} if main else {"parsing_timeout": None}))
    return bool(verify(gold, pred, **({} if main else {"timeout_seconds": None})))


_DOWNLOADS = [  # (words in the path that suggest this set, the command that fetches it)
    (("dapo",), "huggingface-cli download --repo-type dataset BytedTsinghua-SIA/DAPO-Math-17k --local-dir data/dapo"),
    (("2024", "aime24"), "huggingface-cli download --repo-type dataset Maxwell-Jia/AIME_2024 --local-dir data/aime24"),
    (("2025", "aime25"), "huggingface-cli download --repo-type dataset yentinglin/aime_2025 --local-dir data/aime25"),
]
_FIELDS = ("DAPO-Math-17k {prompt, reward_model.ground_truth}, AIME_2024 {Problem, Answer}, "
           "aime_2025 or plain {problem, answer}")


def _row_to_problem(row, where, default_source):
    """One data row in any of the accepted layouts -> {problem, answer, task_type}."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with fields {_FIELDS}")
    if "prompt" in row and isinstance(row.get("reward_model"), dict):
        prompt = row["prompt"]
        if not isinstance(prompt, str):  # a chat: keep the user turns
            prompt = "\n".join(m["content"] for m in prompt if m.get("role", "user") == "user")
        problem, answer = prompt, row["reward_model"].get("ground_truth")
    else:
        problem = row.get("problem", row.get("Problem"))
        answer = row.get("answer", row.get("Answer"))
    if not isinstance(problem, str) or answer is None:
        raise ValueError(f"{where}: cannot find a problem and an answer in fields {sorted(row)}; "
                         f"expected {_FIELDS}")
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    return {"problem": problem, "answer": str(answer),
            "task_type": str(row.get("data_source") or default_source)}


def load_math_problems(path, dedup=True):
    """Problems from a .jsonl or .parquet file, or every such file under a directory."""
    if not os.path.exists(path):
        wanted = [cmd for words, cmd in _DOWNLOADS if any(w in path.lower() for w in words)] \
            or [cmd for _, cmd in _DOWNLOADS]
        raise FileNotFoundError(f"math data not found at {path!r}. Download it with: "
                                + " ; ".join(wanted) + " (then pass the folder or a file in it)")
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, names in os.walk(path) for f in names
        if f.endswith((".jsonl", ".parquet")))
    if not files:
        raise FileNotFoundError(f"no .jsonl or .parquet files under {path!r}")
    problems, seen = [], set()
    source = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]  # task_type fallback
    for file in files:
        for where, row in _read_rows(file):
            p = _row_to_problem(row, where, source)
            if not (dedup and p["problem"] in seen):
                seen.add(p["problem"])
                problems.append(p)
    if not problems:
        raise ValueError(f"{path!r} holds no problems")
    return problems


_LOADED = {}


def _shared_problems(path, dedup):
    """load_math_problems once per file version: the B x n envs of a batch share one copy."""
    key = (os.path.abspath(path), dedup, os.path.getmtime(path) if os.path.exists(path) else None)
    if key not in _LOADED:
        _LOADED[key] = load_math_problems(path, dedup)
    return _LOADED[key]


def _read_rows(file):
    """Yield (location, row dict) from a .jsonl or .parquet file."""
    if file.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {file} needs pyarrow: pip install pyarrow "
                              "(or convert it to .jsonl)") from None
        for i, row in enumerate(pq.read_table(file).to_pylist()):
            yield f"{file}: row {i}", row
        return
    if not file.endswith(".jsonl"):
        raise ValueError(f"{file}: expected a .jsonl or .parquet file")
    with open(file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"{file}:{n}: not valid JSON ({exc}); expected one object "
                                     f"per line with fields {_FIELDS}") from None
                yield f"{file}:{n}", row


def arithmetic_problem(rng):
    """A generated integer task (problem, answer, family): easy with the code tool, hard without."""
    family = rng.choice(["two_digit", "mul_add", "expression", "range_sum", "mod_pow"])
    if family == "two_digit":  # within reach of a small model without the tool
        a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice("+-*")
        return f"What is {a} {op} {b}?", {"+": a + b, "-": a - b, "*": a * b}[op], family
    if family == "mul_add":
        a, b, c = rng.randint(100, 99999), rng.randint(10, 999), rng.randint(10, 9999)
        return f"What is {a} * {b} + {c}?", a * b + c, family
    if family == "expression":
        value = rng.randint(2, 999)
        text = str(value)
        for _ in range(rng.randint(2, 4)):  # each round combines the expression so far with a number
            n, op = rng.randint(2, 999), rng.choice("+-*")
            apply = {"+": operator.add, "-": operator.sub, "*": operator.mul}[op]
            inner = f"({text})" if " " in text else text
            if rng.random() < 0.5:
                text, value = f"{inner} {op} {n}", apply(value, n)
            else:
                text, value = f"{n} {op} {inner}", apply(n, value)
        return f"Compute {text}.", value, family
    if family == "range_sum":
        lo, hi, k = rng.randint(1, 500), rng.randint(600, 20000), rng.randint(2, 13)
        return (f"What is the sum of all integers from {lo} to {hi} (inclusive) that are divisible "
                f"by {k}?", sum(range(-(-lo // k) * k, hi + 1, k)), family)
    a, e, m = rng.randint(2, 999), rng.randint(10, 10**6), rng.randint(7, 10**4)
    return f"What is the remainder when {a}^{e} is divided by {m}?", pow(a, e, m), family


_MATH_INSTRUCTIONS = """You can run Python to help you. To run code, write a tool call like this:
<tool_call>{"name": "code_interpreter", "arguments": {"code": "print(12 * 34)"}}</tool_call>
(a ```python code block works too). Only the first tool call in a message runs; what the code prints comes back to you inside <output></output>. When you know the answer, reply without a tool call and end your reply with the final answer as \\boxed{answer}."""


class MathEnv(Env):
    """Math with a Python code tool; the whole conversation is one sample (context='full').

    reset -> the first user message (problem + tool protocol + boxed-answer instruction). step(reply):
    a reply with a tool call runs it (reward 0, not done) and returns "<output>\\n...\\n</output>"
    as the next user message; a reply without one, or the `max_turns`-th reply, ends the episode
    with +1 if the answer is correct else -1 (spec §7.1). data=None: generated arithmetic
    (`split` picks a disjoint problem stream); otherwise a seeded random problem (train) or
    problems[seed % len(problems)] (any other split: evaluation walks the file in order).
    verifier: "strict" (official, spec §9.6) or "math_verify" (lenient; needs math-verify).
    """
    name, context = "math", "full"

    def __init__(self, data=None, split="train", verifier="strict", max_turns=8, tool_timeout=10.0,
                 memory_mb=1024, max_output_chars=16384, dedup=True):
        if verifier not in ("strict", "math_verify"):
            raise ValueError(f"verifier must be 'strict' or 'math_verify', not {verifier!r}")
        if verifier == "math_verify":
            try:
                import math_verify  # noqa: F401  (fail now, not in the middle of a rollout)
            except ImportError:
                raise ImportError("verifier='math_verify' needs the math-verify package: "
                                  "pip install math-verify") from None
        self.problems = _shared_problems(data, dedup) if data is not None else None
        self.split, self.verifier, self.max_turns = split, verifier, max_turns
        self.tool_kwargs = dict(timeout=tool_timeout, memory_mb=memory_mb, max_output_chars=max_output_chars)

    def reset(self, seed):
        if self.problems is not None and self.split == "train":  # an unbiased pick for any seed range
            self.task = self.problems[random.Random(f"pick/{seed}").randrange(len(self.problems))]
        elif self.problems is not None:  # evaluation walks the file in order
            self.task = self.problems[seed % len(self.problems)]
        else:
            problem, answer, family = arithmetic_problem(random.Random(f"arith/{self.split}/{seed}"))
            self.task = {"problem": problem, "answer": str(answer), "task_type": f"arith/{family}"}
        self.turn, self.done, self.won, self.transcript = 0, False, False, []
        obs = f"{self.task['problem']}\n\n{_MATH_INSTRUCTIONS}"
        return obs, self._info(self.task["problem"], "", True, False, 0)

    def step(self, action_text):
        if self.done:
            return "", 0.0, True, self._info("", "", True, self.won, 0)
        self.turn += 1
        self.transcript.append(action_text)
        code, malformed = extract_tool_call(action_text)
        calls = int(code is not None)
        if code is not None and self.turn < self.max_turns:
            output = format_tool_output(run_code(code, **self.tool_kwargs),
                                        self.tool_kwargs["max_output_chars"])
            obs = f"<output>\n{output}\n</output>"
            self.transcript.append(obs)
            return obs, 0.0, False, self._info(output, code, not malformed, False, calls)
        # No tool call, or out of turns: score everything the policy saw and said (spec §9.6).
        response, truth = "\n".join(self.transcript), self.task["answer"]
        if self.verifier == "strict":
            self.won = strict_box_correct(response, truth)
        else:
            self.won = math_verify_correct(action_text, truth)
        self.done = True
        info = self._info("", last_boxed(action_text) or "", not malformed, self.won, calls)
        info.update(answer=last_boxed(response[-100:]), ground_truth=truth, turns=self.turn)
        return "", 1.0 if self.won else -1.0, True, info

    def _info(self, anchor, action, valid, won, tool_calls):
        return {"won": won, "action_valid": valid, "tool_calls": tool_calls, "anchor": anchor,
                "admissible_actions": None, "action": action, "task_type": self.task["task_type"]}


# ---------------------------------------------------------------------------------------------
# Speed check: python envs.py
# ---------------------------------------------------------------------------------------------

if __name__ == "__main__":
    env, t0 = SokobanEnv(), time.perf_counter()
    for seed in range(500):
        env.reset(seed)
    print(f"sokoban reset: {500 / (time.perf_counter() - t0):.0f} /s")
    rng, stepping, done = random.Random(0), 0.0, True
    for n in range(5000):
        if done:
            env.reset(n)
        reply = f"<think>go</think><action>{rng.choice(SOKOBAN_ACTIONS)}</action>"
        t0 = time.perf_counter()
        _, _, done, _ = env.step(reply)
        stepping += time.perf_counter() - t0
    print(f"sokoban step: {5000 / stepping:.0f} /s")
    print(f"sandbox features: {sandbox_features()}")
    times = sorted(run_code("print(1)")["seconds"] for _ in range(100))
    print(f"sandbox print(1): median {1000 * times[50]:.0f} ms, p90 {1000 * times[90]:.0f} ms")
