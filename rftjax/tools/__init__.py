"""Tool use: the call protocol, host environments and built-in tools."""

from rftjax.tools.calculator import calculate
from rftjax.tools.protocol import (
    LIMIT,
    OK,
    PARSE_ERROR,
    STATUS_NAMES,
    TIMEOUT,
    TOOL_ERROR,
    ToolEnv,
    ToolResult,
    ToolSpec,
)

__all__ = [
    "LIMIT",
    "OK",
    "PARSE_ERROR",
    "STATUS_NAMES",
    "TIMEOUT",
    "TOOL_ERROR",
    "ToolEnv",
    "ToolResult",
    "ToolSpec",
    "calculate",
]
