"""What runs inside Ray processes: teacher actors, the student's training loop, models, losses, data and
augmentation. Nothing here imports the orchestrator.

Root modules: `contract` (the frozen jobs and names the orchestrator hands over; it names the generator's
`SynthSpec`) and `losses` (the divergences, pure tensor maths: no import of the package).

May import: workers.data.
"""
