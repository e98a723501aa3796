#!/usr/bin/env python3
"""Regenerate crates/gates/src/emoji_table.rs from Unicode's emoji-data.txt.

Usage: python3 gen_emoji_table.py /usr/share/unicode/emoji/emoji-data.txt > ../src/emoji_table.rs
(Debian: `apt-get download unicode-data && dpkg -x unicode-data_*.deb DIR`.)
Keeps the union of the Extended_Pictographic and Emoji_Presentation ranges, merged.
"""
import sys

ranges = []
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.split("#")[0].strip()
    if not line:
        continue
    cps, prop = [x.strip() for x in line.split(";")]
    if prop not in ("Extended_Pictographic", "Emoji_Presentation"):
        continue
    a, b = cps.split("..") if ".." in cps else (cps, cps)
    ranges.append((int(a, 16), int(b, 16)))
ranges.sort()
merged = []
for a, b in ranges:
    if merged and a <= merged[-1][1] + 1:
        merged[-1] = (merged[-1][0], max(merged[-1][1], b))
    else:
        merged.append((a, b))
print("// Generated from Unicode 15.0 emoji-data.txt (Debian package unicode-data 15.0.0-1,")
print("// /usr/share/unicode/emoji/emoji-data.txt): the union of the Extended_Pictographic and")
print("// Emoji_Presentation code point ranges, merged and sorted. Regenerate with")
print("// crates/gates/scripts/gen_emoji_table.py.")
print()
print("/// Sorted, non-overlapping inclusive ranges of emoji code points.")
print("pub(crate) const EMOJI_RANGES: &[(u32, u32)] = &[")
for a, b in merged:
    print(f"    (0x{a:04X}, 0x{b:04X}),")
print("];")
