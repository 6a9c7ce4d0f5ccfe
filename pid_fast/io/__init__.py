"""Reading and writing weights: EDM's pickles (safely), pid_fast's safetensors files, teachers.

    errors.py          the importer's errors (unsafe pickle, bad format, config mismatch, unknown source)
    edm_pickle.py      the allow-listing unpickler, its inert stand-ins, load_edm_pickle, module_state_dict
    edm_sources.py     sha256 of the released EDM network sources; the check of a snapshot's embedded source
    edm_config.py      network configs from recorded arguments or from weight shapes; config checks
    safetensors_io.py  save_checkpoint / load_checkpoint: weights + config metadata, written atomically
    teachers.py        read_edm_checkpoint, convert, and the one teacher loader (load_teacher_with_config)
    student_init.py    init_student_from_teacher, student_from_teacher
    atomic.py          the one atomic file writer
    pickle_values.py   numpy dtypes/scalars/arrays rebuilt safely by the unpickler
    diffusers_io.py    diffusers folders: load_diffusers_teacher, export_one_step / load_one_step / one_step_sample
    text_conditioning.py  text-to-image folders: prompt files, the frozen text encoder, cached prompt embeddings
    text_export.py     a text-to-image student as a one-step diffusers pipeline (+ pipeline_pid_text_to_image.py)
"""

from pid_fast.io.edm_config import check_network_config, infer_network_config
from pid_fast.io.edm_pickle import (ModuleStub, PersistentObject, SafeUnpickler, convert_edm_state_dict,
                                    load_edm_pickle, module_state_dict)
from pid_fast.io.edm_sources import KNOWN_EDM_SOURCES
from pid_fast.io.errors import CheckpointFormatError, ConfigMismatchError, UnknownSourceError, UnsafeCheckpointError
from pid_fast.io.safetensors_io import load_checkpoint, read_checkpoint_metadata, save_checkpoint
from pid_fast.io.student_init import InitReport, init_student_from_teacher, student_from_teacher
from pid_fast.io.teachers import EDMCheckpoint, convert, load_teacher, load_teacher_with_config, read_edm_checkpoint

__all__ = [
    "UnsafeCheckpointError", "CheckpointFormatError", "ConfigMismatchError", "PersistentObject", "ModuleStub",
    "SafeUnpickler", "load_edm_pickle", "module_state_dict", "convert_edm_state_dict", "EDMCheckpoint",
    "read_edm_checkpoint", "infer_network_config", "check_network_config", "save_checkpoint",
    "load_checkpoint", "load_teacher", "InitReport", "init_student_from_teacher", "student_from_teacher",
    "convert",
    # added with the io/ layout and the importer's source check
    "load_teacher_with_config", "UnknownSourceError", "KNOWN_EDM_SOURCES", "read_checkpoint_metadata",
]
