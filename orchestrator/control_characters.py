"""The characters no one-line text of ours holds: a name, a setting's value, a line of the log.

A line break in one split a log line or a one-line refusal in two, or made a data dir with one in its
name; a terminal's escape sequence took over the screen that showed it; a bidirectional control
(U+202E, a right-to-left override) made it read otherwise than it is stored.
"""

from __future__ import annotations

import re

# C0 and C1 controls and DEL (C1's U+0085 is a line break to Unicode), and Unicode's line and
# paragraph separators (U+2028, U+2029): what starts a new line, or drives a terminal.
_LINE_CONTROLS = "\x00-\x1f\x7f-\x9f\u2028\u2029"
# Unicode's Bidi_Control characters: the Arabic letter mark, the left-to-right and right-to-left
# marks, embeddings, overrides and isolates, and the two pops.
_DIRECTION_CONTROLS = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
CONTROL_CHARACTER = re.compile(f"[{_LINE_CONTROLS}{_DIRECTION_CONTROLS}]")
