"""The lab: experiments on the shapes world (the study, the ablations, seeds), their figures and page,
the workshop's solutions. May import every other part, and runs the scripts."""
