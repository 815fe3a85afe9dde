"""The pure functional core's foundation: the transform protocol and ``chain`` (base), donated
buffers (donation), block layouts (blocks) and the non-finite guard (guards). It imports nothing
else of the package."""
