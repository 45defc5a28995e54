"""The 9443 protocol both the agent and the process server speak.

``protocol``: frame layout, types, encoders and decoders with their size caps.
``checks``: the checks of the control frames (BEGIN, END, BASIS) an agent sends.
Imports only ``common`` and the standard library.
"""
