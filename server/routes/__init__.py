"""HTTP routes, one module per resource; each stays thin: parse, plan, hand to the engine, format."""
