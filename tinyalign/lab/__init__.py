"""The lab: experiments on the shapes world (study, ablations, seeds, DPO's reward token by token), their
figures and pages, the workshop's solutions and kit. May import every other part, and runs the scripts."""
