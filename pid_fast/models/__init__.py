"""Networks and teachers.

    networks.py         EDM's SongUNet (DDPM++/NCSN++) and DhariwalUNet (ADM), named configs
    preconditioning.py  EDM / VP / VE preconditioning, denoiser wrappers, the Gaussian teacher
    analytic.py         the Gaussian-mixture teacher with an exact ODE, and a small MLP student
"""
