module hearth/helm-render

go 1.22
