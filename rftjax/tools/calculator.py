"""A calculator tool: integer arithmetic on ``+ - * //`` and parentheses, evaluated safely.

The expression is parsed with Python's ``ast`` and only integer literals, unary minus and the
four operators are evaluated; anything else raises ValueError (which the tool protocol turns
into an error observation). Operands are bounded so that no call can take long.
"""

from __future__ import annotations

import ast
import operator
import re

ALPHABET = "0123456789+-*/() "
MAX_DIGITS = 32
_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
}


def _eval(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.FloorDiv) and right == 0:
            raise ValueError("division by zero")
        value = _OPS[type(node.op)](left, right)
        if len(str(abs(value))) > MAX_DIGITS:
            raise ValueError(f"result has more than {MAX_DIGITS} digits")
        return value
    raise ValueError(f"not integer arithmetic: {ast.dump(node)[:60]}")


def calculate(expression: str) -> str:
    """The value of an integer expression such as ``"37*58"`` as text (``"2146"``).

    Raises:
      ValueError: for anything that is not integer arithmetic over ``+ - * //``.
    """
    if not expression.strip() or len(expression) > 256:
        raise ValueError(f"expression must have 1 to 256 characters, got {len(expression)}")
    try:
        # "/" is integer division (the character vocabulary has no "//" token); leading zeros
        # are read as decimal ("07" is 7).
        text = re.sub(r"\b0+(\d)", r"\1", re.sub(r"/+", "//", expression.strip()))
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"cannot parse {expression!r}") from e
    return str(_eval(tree.body))
