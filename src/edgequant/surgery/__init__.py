"""Model surgery: make a float model TIDL-friendly (`adapt`) and win its accuracy back (`finetune_adapted`).

replacements.py holds what each replacement matches and builds; adapt.py applies the
ones a device wants (read from TIDL's rule table, export/tidl_check.py) and checks
them; distill.py fine-tunes the adapted model against the original.
"""
