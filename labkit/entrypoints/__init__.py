"""The faces users touch: `LLM` (llm.py, the offline API) and the OpenAI-compatible server
(server/). The command line sits above them, in labkit/cli.py.

May import: the engine and everything below it; never bench, lab or cli.
"""
