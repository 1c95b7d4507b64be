"""Federated personalization on Flower (docs/federated.md): devices run the personalization pipeline on their own
users' dialogues under their own budgets and send only LoRA tensors and scalar metrics; the server aggregates them.

aggregation.py (pure numpy: FlexLoRA / FedIT and their error against the exact average of ΔW), device.py (one
device's pipeline), messages.py (what may travel, and its audit), client_app.py / server_app.py (Flower's ClientApp and
ServerApp, Message API), launch.py (SuperLink + SuperNodes on localhost, always stopped), fleet.py (chatterbot users as
devices), run.py (the whole run), cli.py (`mesp-mlx federate`). Flower is imported only by the apps and messages.
"""
