"""python -m sandbox: print which isolation holds model-written Python code on this machine."""
from sandbox import describe_isolation

print(describe_isolation())
