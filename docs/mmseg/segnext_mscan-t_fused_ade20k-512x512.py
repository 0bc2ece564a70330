# mmseg's SegNeXt-T ADE20K config with segnext_kernels' fused kernels: the two lines at the end.
# Put this file in configs/segnext/ of mmsegmentation (1.x) and train as usual:
#   python tools/train.py configs/segnext/segnext_mscan-t_fused_ade20k-512x512.py
#   bash tools/dist_train.sh configs/segnext/segnext_mscan-t_fused_ade20k-512x512.py 8
# (tests/test_mmseg.py trains with this very file.)
_base_ = './segnext_mscan-t_1xb16-adamw-160k_ade20k-512x512.py'

custom_imports = dict(imports=['segnext_kernels.mmseg'], allow_failed_imports=False)
custom_hooks = [dict(type='SegNeXtKernelsHook', backend='auto')]
