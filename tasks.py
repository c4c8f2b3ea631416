r"""tasks.py: the benchmarks of rlino (GSM8K, MATH, Countdown) and one synthetic toy task: data, prompts,
verifiers.

Each task is one object in TASKS that can
  * load its train and test splits:  task.load("test", data_dir="../shared/data")  -> list of dicts
  * build a prompt: task.prompt_messages(example) (chat, for instruct models) or task.prompt_text(example)
    (base models)
  * score a completion: task.reward(completion, example) is 1.0 when the final answer is right, else 0.0
    (or `format_reward`, if given, when the answer is in the requested format but wrong).

    >>> task = get_task("gsm8k")
    >>> task.reward("She sells 9 eggs at $2 each, so \\boxed{18}.",
    ...             {"question": "...", "answer": "... #### 18"})
    1.0

Data, with the dataset's own field names. A local directory (the `data_dir` argument, else $RLINO_DATA_DIR)
laid out as <dir>/<task>/<split>.jsonl is used when given; otherwise the Hugging Face hub through
`datasets.load_dataset`:
  gsm8k      question, answer ("...#### 18")  hub: openai/gsm8k "main"
  math       problem, solution, answer        hub train: EleutherAI/hendrycks_math, all 7 subject configs
                                              (the 7,500 original MATH train problems; answer = last \boxed{}
                                              of the solution)
                                              hub test: HuggingFaceH4/MATH-500
  countdown  nums, target                     test: Jiayi-Pan/Countdown-Tasks-3to4 rows 327680-328703
                                              (TinyZero's split);
                                              train: always generated offline, disjoint from the test set
  arith      question, answer ("21")          synthetic sums and differences of 1..20 ("What is 13 + 8?"),
                                              offline
  gsm8k-paper, math-paper                     the data of gsm8k and math with the prompt of the paper's
                                              authors (known for GSM8K; for MATH their repository's, whose use
                                              is unknown), the last \boxed{} alone scored

The verifiers fail closed: they never raise, never evaluate model text as code (no eval/exec), and return
within about a second whatever the text. MATH answers are compared as normalised strings, then by value with a
small LaTeX evaluator on mpmath numbers (mpmath comes with sympy; sympy itself is not used, see the math
section for why).
"""

import ast
import json
import operator
import os
import random
import re
import sys
from fractions import Fraction
from itertools import combinations, product

import mpmath


# ------------------------------------------------------------------------------------------------------- data
class DataError(Exception):
    """A split that cannot be loaded: missing or unreadable file, hub unreachable, no usable records."""


def resolve_data_dir(data_dir: str | None) -> str | None:
    """The local data directory: the argument, else $RLINO_DATA_DIR, else None (use the hub)."""
    return data_dir or os.environ.get("RLINO_DATA_DIR") or None


def read_jsonl(path: str) -> list:
    """One parsed JSON value per non-empty line; a line that does not parse becomes None (a bad record): not
    JSON, nested past Python's recursion limit ('[' * 100_000), or an integer past its 4,300-digit limit."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except (ValueError, RecursionError):  # ValueError includes json.JSONDecodeError
            rows.append(None)
    return rows


# Bounds on record fields, so that a bad record is skipped at loading instead of failing or blowing up later
# (in the tokenizer, the model or the verifier). The data is far inside them: the longest text is a MATH
# solution of 6,767 characters, Countdown has 3 or 4 numbers in 1..99 and targets in 10..100.
MAX_TEXT_CHARS = 20_000  # question, problem, answer: a 10 MB question would blow up the tokenizer and model
MAX_COUNTDOWN_NUMS = 10  # numbers in one Countdown problem
MAX_COUNTDOWN_NUM = 10_000  # each number is in 1..MAX_COUNTDOWN_NUM
MAX_COUNTDOWN_TARGET = 1_000_000  # |target| <= MAX_COUNTDOWN_TARGET
_SURROGATE = "[\ud800-\udfff]"  # a lone UTF-16 half (JSON '\ud800'): no UTF-8 form, the tokenizer refuses it


def is_text(value) -> bool:
    """A string of at most MAX_TEXT_CHARS characters that the tokenizer can encode."""
    return isinstance(value, str) and len(value) <= MAX_TEXT_CHARS and not re.search(_SURROGATE, value)


def is_countdown_nums(value) -> bool:
    """1..MAX_COUNTDOWN_NUMS integers (not bools, not '79') in 1..MAX_COUNTDOWN_NUM: [79, 17, 60]."""
    return (isinstance(value, list) and 1 <= len(value) <= MAX_COUNTDOWN_NUMS
            and all(type(n) is int and 1 <= n <= MAX_COUNTDOWN_NUM for n in value))


def is_countdown_target(value) -> bool:
    """An integer (not a bool) of absolute value at most MAX_COUNTDOWN_TARGET."""
    return type(value) is int and abs(value) <= MAX_COUNTDOWN_TARGET


def keep_valid(rows: list, fields: dict, where: str) -> list[dict]:
    """The rows that have every field, each passing its check (fields: name -> check(value) -> bool); skipped
    rows are counted on stderr, none left is an error."""
    good = [r for r in rows
            if isinstance(r, dict) and all(k in r and check(r[k]) for k, check in fields.items())]
    if not good:
        raise DataError(f"{where}: none of the {len(rows)} records has valid fields {', '.join(fields)}")
    if len(good) < len(rows):
        print(f"{where}: skipped {len(rows) - len(good)} of {len(rows)} records with missing or bad fields",
              file=sys.stderr)
    return good


def load_records(name: str, split: str, data_dir: str | None, fields: dict, from_hub) -> list[dict]:
    """Records of one real split: <data_dir>/<name>/<split>.jsonl when a data directory is given, else
    from_hub(split)."""
    how = (f"pass --data-dir DIR or set RLINO_DATA_DIR (a directory with {name}/{split}.jsonl), "
           "or allow network access to the Hugging Face hub")
    root = resolve_data_dir(data_dir)
    if root is not None:
        path = os.path.join(root, name, f"{split}.jsonl")
        if not os.path.isfile(path):
            raise DataError(f"{name}/{split}: no file {path}; {how}")
        rows = read_jsonl(path)
    else:
        try:
            rows = from_hub(split)
        except Exception as e:  # offline, unknown id, bad cache, ...: the hub raises many kinds of errors
            reason = (str(e).splitlines() or [""])[0][:120]
            raise DataError(f"{name}/{split}: not available from the Hugging Face hub "
                            f"({type(e).__name__}: {reason}); {how}") from e
    return keep_valid(rows, fields, f"{name}/{split}")


def hub_rows(path: str, config: str | None, split: str) -> list[dict]:
    """Rows of a Hugging Face hub dataset split (honours HF_HUB_OFFLINE and the local hub cache)."""
    from datasets import load_dataset  # imported here: slow to import, and only the hub path needs it
    return list(load_dataset(path, config, split=split))


# ------------------------------------------------------------------------------------ answer parsing (shared)
# Regular expressions are kept as strings: the re module caches them.
# ASCII digits only: '١٢' is no number
_NUMBER = r"-?(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?"


def parse_number(text: str) -> Fraction | None:
    """The first number in `text`, exact, or None: '$1,000' -> 1000, '18.00 dollars' -> 18, '-3' -> -3."""
    match = re.search(_NUMBER, text)
    if match is None or len(match.group()) > 30:  # refuse absurd lengths rather than build huge integers
        return None
    return Fraction(match.group().replace(",", ""))


def braced(text: str, start: int) -> str | None:
    """The text inside the brace group that opens at text[start], or None when it never closes.

    Escaped braces do not count: braced('{\\{1,2\\}} x', 0) -> '\\{1,2\\}'.
    """
    depth, i = 0, start
    while i < len(text):
        if text[i] == "\\":
            i += 2  # skip the escaped character (\{, \}, \\)
            continue
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} (brace-matched; also '\\boxed 5'), or None if absent or
    unclosed.

    'so x = \\boxed{\\frac{1}{2}}.' -> '\\frac{1}{2}'
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    end = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if text.startswith("{", end):
        return braced(text, end)
    spaced = re.match(r" +([^\s$]+)", text[end:end + 100])  # '\boxed 5$'
    return spaced.group(1) if spaced else None


# ---------------------------------------------------------------------------------------------------- prompts
# Plain-text prompts follow TinyZero's base-model template and end with `response_prefix`, where the model
# continues. Chat prompts are a single user message (the tokenizer's chat template adds its default system
# prompt, if any).
PREAMBLE = ("A conversation between User and Assistant. The user asks a question, and the Assistant "
            "solves it. The assistant first thinks about the reasoning process in the mind and then provides "
            "the user with the answer.")
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# The paper's authors' prompt (their public verl scripts, github Durgesh-Kalwar/verl-2llm: the GSM8K and MATH
# preprocessing), given to every model as the bare text, without a chat template.
PAPER_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
SUM_CHAIN_INSTRUCTION = ("Please reason step by step, adding one number at a time, and put your final answer "
                         "within \\boxed{}. For example, for 2 + 1 + 4: 2 + 1 = 3, then 3 + 4 = 7, so the "
                         "answer is \\boxed{7}. For 5 + 3 + 2: 5 + 3 = 8, then 8 + 2 = 10, so the answer is "
                         "\\boxed{10}.")
COUNTDOWN_INSTRUCTION = ("Using the numbers {nums}, create an equation that equals {target}. You can use "
                         "basic arithmetic operations (+, -, *, /) and each number can only be used once. "
                         "Show your work in <think> </think> tags. And return the final answer in "
                         "<answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.")


class Task:
    """One benchmark: its data, its prompts and its verifier. Subclasses define the methods marked
    'per task'."""

    name = ""
    fields: dict = {}  # required record fields and the check each value must pass (is_text, ...)
    # plain-text prompt: what the Assistant has already said
    response_prefix = " Let me solve this step by step.\n"

    def load(self, split: str, data_dir: str | None = None, limit: int | None = None,
             seed: int = 0) -> list[dict]:
        """Records of `split` ("train" or "test") in file order; `limit` keeps the first `limit`.

        `seed` seeds generated splits only (Countdown train: 10,000 problems unless `limit`, about 1.4 s per
        thousand; arith); shuffling real data is the trainer's job.
        """
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; choose from train, test")
        records = self._records(split, data_dir, limit, seed)
        return records if limit is None else records[:limit]

    def _records(self, split, data_dir, limit, seed):  # a "-paper" task reads its benchmark's data
        return load_records(self.name.removesuffix("-paper"), split, data_dir, self.fields, self._from_hub)

    def _from_hub(self, split: str) -> list[dict]:  # per task
        raise NotImplementedError

    def instruction(self, example: dict) -> str:  # per task: the user's request
        raise NotImplementedError

    def prompt_messages(self, example: dict) -> list[dict]:
        """Chat messages for instruct models (pass to tokenizer.apply_chat_template with
        add_generation_prompt)."""
        return [{"role": "user", "content": self.instruction(example)}]

    def prompt_text(self, example: dict) -> str:
        """Plain-text prompt for base models; it ends where the model should continue."""
        return f"{PREAMBLE}\nUser: {self.instruction(example)}\nAssistant:{self.response_prefix}"

    def reward(self, completion: str, example: dict, format_reward: float = 0.0) -> float:
        """1.0 if the completion's final answer is right; else `format_reward` if the answer is in the
        requested format, else 0.0. Fails closed: any error in scoring gives 0.0."""
        try:
            if self.is_correct(completion, example):
                return 1.0
            return float(format_reward) if self.is_formatted(completion) else 0.0
        except Exception:  # odd input or a verifier bug must never crash training or count as correct
            return 0.0

    # per task: the final answer as written, for logging
    def extract_answer(self, completion: str) -> str | None:
        raise NotImplementedError

    def is_correct(self, completion: str, example: dict) -> bool:  # per task
        raise NotImplementedError

    def is_formatted(self, completion: str) -> bool:  # per task: is the answer where the prompt asked for it?
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------------ gsm8k
_GSM8K_MARKERS = (r"####([^\n]*)", r"(?i:the answer is):?([^\n]*)")


class GSM8K(Task):
    """Grade-school word problems; the gold answer is the number after '####'."""

    name = "gsm8k"
    fields = {"question": is_text, "answer": is_text}

    def _from_hub(self, split):
        return hub_rows("openai/gsm8k", "main", split)

    def instruction(self, example):
        return f"{example['question']} {BOXED_INSTRUCTION}"

    def extract_answer(self, completion):
        """The last \\boxed{}, else the rest of the line after the last '####', else after the last
        'the answer is', else the last number."""
        boxed = last_boxed(completion)
        if boxed is not None:
            return boxed
        for marker in _GSM8K_MARKERS:
            hits = re.findall(marker, completion)
            if hits:
                return hits[-1].strip()
        numbers = re.findall(_NUMBER, completion)
        return numbers[-1] if numbers else None

    def is_correct(self, completion, example):
        """Numeric comparison of the first number in the extracted answer with the gold number.

        gold '... #### 1000':  '... \\boxed{\\$1,000}' -> 1.0, 'The answer is 1000.00' -> 1.0,
        '\\boxed{-1000}' -> 0.0
        """
        given = self.extract_answer(completion)
        gold = parse_number(example["answer"].split("####")[-1])
        return given is not None and gold is not None and parse_number(given) == gold

    def is_formatted(self, completion):
        return last_boxed(completion) is not None


# ------------------------------------------------------------------------------------------------------- math
_MATH_REWRITES = [  # (pattern, replacement), applied in order by normalize_math
    (r"\\[dt]frac", r"\\frac"),  # \dfrac, \tfrac -> \frac
    (r"\\left|\\right|\\displaystyle|(?<!\\)\\[!,;: ]|~", ""),  # sizing and spacing (not the \\ of '\\ ')
    (r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\?%|\\?\$", ""),  # degrees, percent, dollars
    # trailing units: '15\mbox{ cm}^2' -> '15'
    (r"(?<=\S)\s*\\(?:text|mbox|mathrm)\{[^{}]*\}(?:\^[0-9])?$", ""),
    (r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1"),  # other text: '\text{(B)}' -> '(B)'
    (r"\s+", ""),
    (r"\.$", ""),  # a closing full stop
    (r"^[a-zA-Z]\w*(?:=|\\in)(?=.)", ""),  # 'x=3' -> '3', 'x\in[-2,7]' -> '[-2,7]'
    (r"\\(frac|sqrt)([0-9a-zA-Z])", r"\\\1{\2}"),  # '\frac12' -> '\frac{1}2', '\sqrt2' -> '\sqrt{2}'
    (r"(\\frac\{[^{}]*\})([0-9a-zA-Z])", r"\1{\2}"),  # '\frac{1}2' -> '\frac{1}{2}'
    (r"_\{(\w+)\}", r"_\1"),  # bases: '4210_{5}' -> '4210_5'
    (r"^\(([A-Z])\)$", r"\1"),  # choices: '(B)' -> 'B'
    (r"(?<![0-9}])\.(?=[0-9])", "0."),  # '.35' -> '0.35'
    (r"^-?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?$",
     lambda m: m.group().replace(",", "")),  # '10,080' -> '10080'
]


def normalize_math(answer: str) -> str:
    """Canonical string form of a MATH answer: '\\left( 3, \\dfrac12 \\right)' -> '(3,\\frac{1}{2})',
    '90^\\circ' -> '90'."""
    answer = answer.strip()
    for pattern, replacement in _MATH_REWRITES:
        answer = re.sub(pattern, replacement, answer)
    return answer


# Answers that still differ as strings are compared by value, with a small LaTeX evaluator on mpmath numbers
# (40 digits, in a private context). Letters stand for variables: equal values at two probe points, to 1e-25
# relative (1e-35 absolute near 0), count as equal expressions. Sympy is deliberately not used: its automatic
# simplification can run for minutes on a short answer ('\sqrt{(y^{693}+\frac{i}{y}\sqrt[9]{x})^{33}}'
# took 79 s to build), and no timer can interrupt it outside the main thread. Here each token costs
# microseconds and exponents are capped, so time is bounded.
_MP = mpmath.MPContext()
_MP.dps = 40
_TOKEN = r"[0-9]+(?:\.[0-9]+)?|\.[0-9]+|\\[a-zA-Z]+|[a-zA-Z]|[-+*/^(){}\[\]]"
_CLOSING = {"(": ")", "[": "]", "{": "}"}


def latex_value(latex: str, point: int):
    """The value of a normalised LaTeX answer (an mpmath number), or None when it is outside this small
    subset: numbers (up to 30 digits, held exactly), letters (i = imaginary unit; any other letter x takes the
    probe value sqrt(ord(x)) / (7 + point)), \\pi, + - * / ^, \\cdot, \\times, \\div, implicit products,
    \\frac{a}{b}, \\sqrt{x}, \\sqrt[n]{x}, and ( ) [ ] { } groups. '2\\sqrt{5}' -> 4.472...,
    '\\cot x' -> None.
    At most 100 tokens, nesting depth 20, numbers of 30 digits and exponents of absolute value 1000."""
    tokens = re.findall(_TOKEN, latex)
    if not tokens or len(tokens) > 100 or sum(map(len, tokens)) != len(latex):
        return None  # empty, too long, or characters outside the subset
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take(expected=None):
        nonlocal pos
        token = peek()
        if token is None or (expected is not None and token != expected):
            raise ValueError(f"expected {expected}, got {token}")
        pos += 1
        return token

    def total(depth):  # total := product (('+' | '-') product)*
        value = product(depth)
        while peek() in ("+", "-"):
            value = value + product(depth) if take() == "+" else value - product(depth)
        return value

    def product(depth):  # product := signed (('*' | '/' | nothing) signed)*
        value = signed(depth)
        while True:
            token = peek()
            if token in ("*", "\\cdot", "\\times"):
                take()
                value *= signed(depth)
            elif token in ("/", "\\div"):
                take()
                value /= signed(depth)
            elif token is not None and token not in ("+", "-", ")", "]", "}"):
                value *= power(depth)  # implicit product: '2\sqrt{5}', '3x'
            else:
                return value

    def signed(depth):  # signed := ('-' | '+') signed | power
        if peek() in ("-", "+"):
            return -signed(depth) if take() == "-" else signed(depth)
        return power(depth)

    def power(depth):  # power := atom ('^' signed)?
        base = atom(depth)
        if peek() != "^":
            return base
        take()
        return raise_to(base, signed(depth + 1))

    def raise_to(base, exponent):
        if not abs(exponent) <= 1000:  # 10^{10^{10}}: refuse towers instead of computing them
            raise ValueError("exponent too large")
        return _MP.power(base, exponent)

    def atom(depth):
        if depth > 20:
            raise ValueError("nested too deeply")
        token = take()
        if token[0].isdigit() or token[0] == ".":
            if len(token) > 30:
                raise ValueError("number too long")
            return _MP.mpf(token)
        if token in _CLOSING:
            value = total(depth + 1)
            take(_CLOSING[token])
            return value
        if token == "\\frac":
            return atom(depth + 1) / atom(depth + 1)
        if token == "\\sqrt":
            index = 2
            if peek() == "[":
                take()
                index = total(depth + 1)
                take("]")
            return raise_to(atom(depth + 1), 1 / index)
        if token == "\\pi":
            return _MP.pi
        if token == "i":
            return _MP.mpc(0, 1)
        if len(token) == 1 and token.isalpha():
            return _MP.sqrt(ord(token)) / (7 + point)
        raise ValueError(f"unsupported {token}")

    try:
        value = total(0)
    except (ValueError, TypeError, ZeroDivisionError):
        return None
    return value if pos == len(tokens) and _MP.isfinite(value) else None


def same_value(a: str, b: str) -> bool:
    """Whether two normalised LaTeX answers have the same value: '\\frac{1}{2}' = '0.5',
    '2\\sqrt{5}' = '\\sqrt{20}', '(x+1)^2' = 'x^2+2x+1'; '0.333333' != '\\frac{1}{3}'."""
    for point in (0, 1):
        x, y = latex_value(a, point), latex_value(b, point)
        if x is None or y is None or abs(x - y) > 1e-25 * max(abs(x), abs(y), 1e-10):
            return False
    return True


def split_answer(answer: str) -> tuple[str, list[str], str]:
    """Enclosing brackets and comma-separated items of a normalised answer: '(3,\\frac{\\pi}{2}]' ->
    ('(', ['3', '\\frac{\\pi}{2}'], ']'), '1,2' -> ('', ['1', '2'], ''),
    '(a+5)(b+2)' -> ('', ['(a+5)(b+2)'], '')."""
    depth, closes_at = 0, None
    for i, char in enumerate(answer):
        depth += (char in "([{") - (char in ")]}")
        if depth == 0:
            closes_at = i
            break
    enclosed = answer[:1] in ("(", "[") and closes_at == len(answer) - 1
    opening, inner, closing = (answer[0], answer[1:-1], answer[-1]) if enclosed else ("", answer, "")
    items, depth, start = [], 0, 0
    for i, char in enumerate(inner):
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            items.append(inner[start:i])
            start = i + 1
    items.append(inner[start:])
    return (opening, items, closing) if len(items) > 1 else ("", [answer], "")  # '(x+1)' is no tuple


def math_equal(given: str, gold: str) -> bool:
    """Equal after normalisation, or, with the same brackets and number of items, the same value item by item.

    '\\dfrac{1}{2}' = '0.5', '(3, \\pi/2)' = '\\left( 3, \\frac{\\pi}{2} \\right)', '(3,4)' != '(3,4]'.
    """
    if len(given) > 1000:
        return False
    given, gold = normalize_math(given), normalize_math(gold)
    if given == gold:
        return True
    (open_a, items_a, close_a), (open_b, items_b, close_b) = split_answer(given), split_answer(gold)
    if (open_a, close_a, len(items_a)) != (open_b, close_b, len(items_b)):
        return False
    return all(a == b or same_value(a, b) for a, b in zip(items_a, items_b))


_MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                  "prealgebra", "precalculus")


class MATH(Task):
    """Competition mathematics (Hendrycks et al.); the gold answer is a LaTeX string."""

    name = "math"
    fields = {"problem": is_text, "answer": is_text}

    def _from_hub(self, split):
        if split == "test":
            return hub_rows("HuggingFaceH4/MATH-500", None, "test")
        return [{"problem": row["problem"], "solution": row["solution"],
                 "answer": last_boxed(row["solution"]), "subject": row["type"]}
                for subject in _MATH_SUBJECTS
                for row in hub_rows("EleutherAI/hendrycks_math", subject, "train")]

    def instruction(self, example):
        return f"{example['problem']} {BOXED_INSTRUCTION}"

    def extract_answer(self, completion):
        return last_boxed(completion)

    def is_correct(self, completion, example):
        """The last \\boxed{} against the gold answer with math_equal.

        gold '\\frac{1}{2}':  '\\boxed{0.5}' -> 1.0, '\\boxed{\\dfrac12}' -> 1.0, '\\boxed{2}' -> 0.0,
        'so 1/2' -> 0.0
        """
        given = last_boxed(completion)
        return given is not None and math_equal(given, example["answer"])

    def is_formatted(self, completion):
        return last_boxed(completion) is not None


# -------------------------------------------------------------------------------------------------- countdown
def _steps(a: int, b: int) -> list[tuple[int, str]]:
    """One Countdown step on a >= b: a+b, a*b, a-b, and a/b when the division is exact."""
    steps = [(a + b, "+"), (a * b, "*"), (a - b, "-")]
    if b and a % b == 0:
        steps.append((a // b, "/"))
    return steps


def solve_countdown(nums: list[int], target: int) -> str | None:
    """An expression that uses every number once and equals target, or None. Depth-first search over pairwise
    combinations with non-negative integer intermediates (the data README's rule):
    ([79, 17, 60], 36) -> '(79 + 17) - 60'.
    """
    def search(items):  # items: [(value, expression tree)]; returns a tree equal to target, or None
        for i, j in combinations(range(len(items)), 2):
            (a, x), (b, y) = (items[i], items[j]) if items[i][0] >= items[j][0] else (items[j], items[i])
            rest = items[:i] + items[i + 1:j] + items[j + 1:]
            for value, op in _steps(a, b):
                if not rest:
                    if value == target:
                        return op, x, y
                elif found := search(rest + [(value, (op, x, y))]):
                    return found
        return None

    def text(tree):
        return str(tree) if isinstance(tree, int) else f"({text(tree[1])} {tree[0]} {text(tree[2])})"

    if len(nums) == 1:
        return str(nums[0]) if nums[0] == target else None
    tree = search([(n, n) for n in nums])
    return text(tree)[1:-1] if tree else None


def generate_countdown(n: int, seed: int = 0, exclude=frozenset()) -> list[dict]:
    """`n` problems drawn as in the data README: k uniform in {3, 4}, target uniform in 10..100, k numbers
    uniform in 1..99 redrawn until solvable. Problems whose (target, sorted nums) is in `exclude` are
    dropped."""
    rng, problems = random.Random(seed), []
    while len(problems) < n:
        k, target = rng.randint(3, 4), rng.randint(10, 100)
        nums = [rng.randint(1, 99) for _ in range(k)]
        while solve_countdown(nums, target) is None:
            nums = [rng.randint(1, 99) for _ in range(k)]
        if (target, tuple(sorted(nums))) not in exclude:
            problems.append({"target": target, "nums": nums})
    return problems


_COUNTDOWN_CHARS = r"[0-9+\-*/()\s]+"
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_ALLOWED_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.USub, ast.UAdd, ast.Constant, *_OPERATORS)


def _evaluate(node) -> Fraction:
    """Exact value of a checked expression tree; OverflowError past 10^12, ZeroDivisionError on '/ 0'."""
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    value = _OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if abs(value.numerator) > 10**12 or value.denominator > 10**12:
        raise OverflowError("value too large")
    return value


def countdown_value(expression: str, nums: list[int]) -> Fraction | None:
    """The exact value of `expression` if it is a legal answer for `nums` (integers, + - * /, parentheses,
    each number used exactly once), else None: ('(79 + 17) - 60', [79, 17, 60]) -> 36,
    ('79 - 17', [79, 17, 60]) -> None."""
    if len(expression) > 300 or not re.fullmatch(_COUNTDOWN_CHARS, expression):
        return None
    try:
        tree = ast.parse(expression, mode="eval")  # parsing only, never evaluated by Python
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    nodes = list(ast.walk(tree))
    if not all(isinstance(node, _ALLOWED_NODES) for node in nodes):
        return None
    used = [node.value for node in nodes if isinstance(node, ast.Constant)]
    if any(type(v) is not int for v in used) or sorted(used) != sorted(nums):
        return None
    try:
        return _evaluate(tree.body)
    except (ZeroDivisionError, OverflowError, RecursionError):
        return None


class Countdown(Task):
    """Reach the target from the given numbers with + - * / (TinyZero); the answer goes in <answer> tags."""

    name = "countdown"
    fields = {"nums": is_countdown_nums, "target": is_countdown_target}
    response_prefix = " Let me solve this step by step.\n<think>"

    def _records(self, split, data_dir, limit, seed):
        if split == "test":
            return super()._records(split, data_dir, limit, seed)
        try:
            test = super()._records("test", data_dir, None, seed)
        except DataError as e:
            print(f"countdown: cannot exclude the test problems from the generated ones: {e}",
                  file=sys.stderr)
            test = []
        exclude = {(r["target"], tuple(sorted(r["nums"]))) for r in test}
        return generate_countdown(10_000 if limit is None else limit, seed, exclude)

    def _from_hub(self, split):  # only "test": TinyZero's test split is the dataset's rows 327680..328703
        return [{"target": row["target"], "nums": row["nums"]}
                for row in hub_rows("Jiayi-Pan/Countdown-Tasks-3to4", None, "train[327680:328704]")]

    def instruction(self, example):
        return COUNTDOWN_INSTRUCTION.format(nums=list(example["nums"]), target=example["target"])

    def extract_answer(self, completion):
        """The text inside the last <answer>...</answer>, or None (an unclosed tag does not count)."""
        end = completion.rfind("</answer>")
        start = completion.rfind("<answer>", 0, max(end, 0))
        return completion[start + len("<answer>"):end].strip() if end >= 0 and start >= 0 else None

    def is_correct(self, completion, example):
        """The last <answer> must use exactly the given numbers and hit the target (|value - target| < 1e-5).

        nums [79, 17, 60], target 36:  '<answer>79 + 17 - 60</answer>' -> 1.0,
        '<answer>79 - 17 - 60</answer>' -> 0.0 (wrong value), '<answer>96 - 60</answer>' -> 0.0 (numbers),
        '<answer>79 + 17 - 60 = 36</answer>' -> 0.0 ('=')
        """
        expression = self.extract_answer(completion)
        value = None if expression is None else countdown_value(expression, example["nums"])
        return value is not None and abs(value - example["target"]) < 1e-5

    def is_formatted(self, completion):
        return self.extract_answer(completion) is not None


# ------------------------------------------------------------------------------------------ arith (synthetic)
class Arith(GSM8K):
    """SYNTHETIC toy task for CPU experiments, not a benchmark: 'What is 13 + 8?' / 'What is 7 - 19?' with two
    numbers in 1..20, small enough that SmolLM2-135M gets about one in five right and can learn from its own
    samples. All 800 problems are split once by a fixed seed: 200 test, 600 train (shuffled by `seed`), so the
    splits are disjoint. It asks for the bare number and is scored like GSM8K: the answer field is the number
    ('21', '-12')."""

    name = "arith"

    def instruction(self, example):
        return f"{example['question']} Answer with just the number."

    def _records(self, split, data_dir, limit, seed):
        problems = [(a, op, b) for a in range(1, 21) for op in "+-" for b in range(1, 21)]
        random.Random(1234).shuffle(problems)
        chosen = problems[:200] if split == "test" else problems[200:]
        if split == "train":
            random.Random(seed).shuffle(chosen)
        return [{"question": f"What is {a} {op} {b}?", "answer": str(a + b if op == "+" else a - b)}
                for a, op, b in chosen]


class ArithReason(Arith):
    """SYNTHETIC task for the CPU length experiment, not a benchmark: arith's problems and splits ('What is
    13 + 8?'), with GSM8K's instruction to reason step by step before a final \\boxed{} answer instead of a
    bare number, so that the length of an answer is free to move in training. SmolLM2-135M answers about one
    in five right, in ~120 tokens (a pilot of 64 samples at temperature 0.8: README, "Experiments")."""

    name = "arith-reason"

    def instruction(self, example):
        return f"{example['question']} {BOXED_INSTRUCTION}"


class SumChain(Arith):
    """SYNTHETIC task for the CPU length-gap experiment (experiment 4), not a benchmark: 'What is 3 + 1 + 5
    + 2?', four terms in 1..5, with two worked examples in the prompt, so that a right answer is usually
    written out (SmolLM2-135M: ~9 % right at T 0.8, right answers ~140 tokens; the screen of 16 designs is in
    bench/EXPERIMENTS.md). Scored like GSM8K (the last \\boxed{}, else the last number). All 625 problems
    are split once by a fixed seed: 125 test, 500 train (shuffled by `seed`)."""

    name = "sum-chain"

    def instruction(self, example):
        return f"{example['question']} {SUM_CHAIN_INSTRUCTION}"

    def _records(self, split, data_dir, limit, seed):
        problems = list(product(range(1, 6), repeat=4))
        random.Random(1234).shuffle(problems)
        chosen = problems[:125] if split == "test" else problems[125:]
        if split == "train":
            random.Random(seed).shuffle(chosen)
        return [{"question": "What is " + " + ".join(map(str, terms)) + "?", "answer": str(sum(terms))}
                for terms in chosen]


# ----------------------------------------------------------------------------- the paper's prompts (GPU rows)
class AsThePaper:
    """A benchmark posed as the paper's authors posed it: the question, then PAPER_INSTRUCTION, as the bare
    prompt text (their verl scripts give no template, no preamble), scored on the last \\boxed{} alone."""

    def instruction(self, example):
        return f"{example[self.question_field]} {PAPER_INSTRUCTION}"

    def prompt_text(self, example):
        return self.instruction(example)


class GSM8KPaper(AsThePaper, GSM8K):
    """GSM8K as in the paper: the last \\boxed{} must hold the gold number ('####' and 'the answer is' do not
    count, as in the authors' reward)."""

    name, question_field = "gsm8k-paper", "question"

    def extract_answer(self, completion):
        return last_boxed(completion)


class MATHPaper(AsThePaper, MATH):
    """MATH with the same sentence: the MATH preprocessing in the authors' repository (verl's, unchanged);
    whether the paper used it is unknown. MATH's verifier already reads the last \\boxed{} alone."""

    name, question_field = "math-paper", "problem"


# --------------------------------------------------------------------------------------------------- registry
TASKS: dict[str, Task] = {task.name: task for task in (GSM8K(), MATH(), Countdown(), Arith(), ArithReason(),
                                                       SumChain(), GSM8KPaper(), MATHPaper())}


def get_task(name: str) -> Task:
    """The registered task called `name`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]
