"""The parts ``Bridge`` is a facade over, one job each:

  * ``reader.CheckpointReader`` -- opens the HF source (directory or ``builtin:NAME``) and the
    views over its tensors (stacked experts), picks the family;
  * ``local.LocalPlan`` -- this rank's side: process groups, parameter views, and the plan items
    (HF sources + transform per local parameter), for the base weights or the LoRA factors;
  * ``adapters.AdapterState`` -- the LoRA lifecycle (spec, adapter table, factor shapes);
  * ``loader.Loader`` -- HF tensors -> megatron parameters (base weights and adapters);
  * ``writer.Writer`` -- export plans, HF ``save_weights`` and PEFT adapter directories;
  * ``syncplan.SyncPlanner`` -- the kept export plans and receiver groups of RL weight syncs.

Each part's public methods are the seams ``checkpoint``, ``verify`` and ``bench`` use.
"""
