"""tokenprobe's shipped documentation: methods.md, every measure's definition (package data)."""
