"""The functional API: the transforms of Adam-mini (and AdamW) and the optimizers as short chains
of them. Pure; imports the core and the planner (``plan=None`` plans from names), never the
optimizer side."""
