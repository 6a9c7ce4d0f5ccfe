"""Networks and teachers.

    layers.py           EDM's layers: Linear, Conv2d (resampling), GroupNorm, UNetBlock, embeddings
    unets.py            SongUNet (DDPM++ / NCSN++) and DhariwalUNet (ADM)
    networks.py         the networks by name (NETWORK_CONFIGS), build_network, build_denoiser (network +
                        preconditioning from a teacher config); re-exports the classes
    preconditioning.py  EDM / VP / VE preconditioning (c_skip, c_out, c_in, c_noise), denoiser wrappers
    analytic.py         the Gaussian-mixture teacher with an exact ODE, and a small MLP student
    precision.py        precision modes of the student (fp32, bf16, fp16, fp32 islands for the time path)
    edm2.py             EDM2's magnitude-preserving U-Net (EDM2UNet) and Precond (EDM2Precond)
    diffusers_adapter.py  diffusers UNets: DiffusersUNet (raw F), DiffusersDenoiser (UNet + schedule -> D)
"""
