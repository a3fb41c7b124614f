"""What both papers' experiments share: the fair-comparison protocol (:mod:`.protocol`), checkpoints
(:mod:`.checkpoint`), datasets (:mod:`.data`), NTK/CKA diagnostics (:mod:`.diagnostics`), run records
(:mod:`.records`: metrics files, device, machine), figure helpers (:mod:`.figures`), markdown tables
(:mod:`.markdown`) and command-line option types (:mod:`.options`).

Nothing here knows either paper; the paper packages import it, never the reverse.
"""
